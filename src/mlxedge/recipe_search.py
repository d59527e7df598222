"""Turn quantization requests (bits, a preset recipe, a target size, data-aware search) into what the loader
applies: one QuantSpec, or a per-module Recipe.

The only module that loads a float model to measure it: a target bits-per-weight needs per-module
sensitivities (quant/sensitivity.py) and data-aware quantization needs activation statistics
(quant/weighted.py), both on a calibration text. The default calibration text is one every Python has —
pydoc's topic texts, taken from the end of the alphabet, while `mlxedge eval` scores from its start.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

from .errors import QuantizationError
from .loading import load_checkpoint, quantizable_modules
from .quant.affine import GROUP_SIZES, QuantSpec, validate_settings
from .quant.recipes import Recipe, preset
from .quant.sensitivity import allocate, fisher_diagonal, impacts, mean_bpw, quantizable_weights
from .quant.weighted import DataAwareQuantizer, collect_importance

CALIBRATION_CHUNKS = 8
CALIBRATION_CTX = 256


def default_calibration_text() -> str:
    """pydoc's topics in reverse key order (evaluation reads them in key order from the start)."""
    from .corpus import builtin_text

    return builtin_text(reverse=True)


def calibration_chunks(tokenizer, text: Optional[str], n_chunks: int = CALIBRATION_CHUNKS,
                       ctx: int = CALIBRATION_CTX) -> list:
    text = text if text is not None else default_calibration_text()
    ids = list(tokenizer.encode(text[: n_chunks * ctx * 8]))
    chunks = [ids[i:i + ctx] for i in range(0, len(ids) - ctx + 1, ctx)][:n_chunks]
    if not chunks:
        raise QuantizationError(f"the calibration text has {len(ids)} tokens; give at least {ctx}.")
    return chunks


class _Measurements:
    """One source's calibration measurements, each made on first use: the float model (bound to this device's
    kernels), the activation importance, the Fisher diagonal, and per-module impacts per (group size,
    quantizer)."""

    def __init__(self, checkpoint, text: Optional[str]):
        self.checkpoint, self.text = checkpoint, text
        self._model = self._modules = self._chunks = self._choice = None
        self._importance = None
        self._fisher: dict = {}
        self._impacts: dict = {}

    def _load(self):
        if self._model is None:
            self._model = load_checkpoint(self.checkpoint, None, dtype="float32").model
            self._modules = quantizable_modules(self._model)
            self._chunks = calibration_chunks(self.checkpoint.load_tokenizer(), self.text)
            self._choice = _measuring_kernels(self._model)
        return self._model

    def modules(self) -> dict:
        self._load()
        return self._modules

    def importance(self) -> dict:
        if self._importance is None:
            self._importance = collect_importance(self._load(), self._chunks)
        return self._importance

    def impacts(self, group_size: int, quantizer, progress=None) -> tuple:
        """({path: {bits: impact}}, {path: shape}) for the modules `group_size` divides."""
        key = (group_size, quantizer is not None)
        if key not in self._impacts:
            weights = quantizable_weights(self.modules(), group_size)
            paths = tuple(sorted(weights))
            if paths not in self._fisher:
                self._fisher[paths] = fisher_diagonal(self._load(), self._chunks, list(paths), progress=progress,
                                                      choice=self._choice)
            impact = impacts(weights, self._fisher[paths], group_size, quantize=quantizer)
            self._impacts[key] = (impact, {p: tuple(w.shape) for p, w in weights.items()})
        return self._impacts[key]


_reused: Optional[dict] = None  # source key -> _Measurements, only inside reuse_measurements()


@contextmanager
def reuse_measurements():
    """Within the block, each source's calibration measurements (importance, Fisher diagonal, impacts) are made
    once and shared by every load or convert of it — for comparing several targets of one model. Outside it
    nothing is kept (a long-running process does not hold a float model and its Fisher diagonal)."""
    global _reused
    outer = _reused
    if outer is None:
        _reused = {}
    try:
        yield
    finally:
        _reused = outer


def _measurements(checkpoint, text: Optional[str]) -> _Measurements:
    if _reused is None:
        return _Measurements(checkpoint, text)
    path = Path(checkpoint.path)
    stat = path.stat()
    # the file as it is now, and what is applied on top of it (a fused adapter changes the weights)
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, text, repr(checkpoint.info.get("adapter")))
    if key not in _reused:
        _reused[key] = _Measurements(checkpoint, text)
    return _reused[key]


def _measuring_kernels(float_model):
    """Bind the float model's matmuls to this device's kernels (the native OpenBLAS path on a CPU, where MLX's
    built-in GEMM is the reference BLAS) for the calibration passes; the choice also serves the backward
    passes (quant/fast_gradients.py)."""
    from .kernels import KernelChoice
    from .quant.binding import bind_kernels

    choice = KernelChoice()
    bind_kernels(float_model, choice)
    return choice


def _read_calibration(calibration) -> Optional[str]:
    if calibration is None:
        return None
    path = Path(calibration).expanduser()
    if not path.is_file():
        raise QuantizationError(f"calibration file {path} does not exist; give a UTF-8 text file.")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise QuantizationError(f"calibration file {path} is not UTF-8 text.") from None


def resolve_quantization(checkpoint, bits, group_size: int, *, recipe: Optional[str] = None,
                         target_bpw: Optional[float] = None, calibration=None, data_aware: bool = False,
                         progress: Optional[Callable[[int, int], None]] = None):
    """None (keep as stored), a QuantSpec for every module, or a Recipe; measures the model when needed."""
    if recipe is None and target_bpw is None and not data_aware:
        return validate_settings(bits, group_size)
    if group_size not in GROUP_SIZES:
        raise QuantizationError(f"group_size={group_size} is not supported; use 32, 64 or 128.")
    if recipe is not None and target_bpw is not None:
        raise QuantizationError("give either a recipe or target_bpw, not both.")
    if checkpoint.quantization:
        raise QuantizationError(f"{checkpoint.source} is stored quantized; recipes, target_bpw and data-aware "
                                "quantization start from float weights — use the float checkpoint.")
    if recipe is not None:
        chosen = preset(recipe, group_size)
        needs_model = data_aware
    else:
        base = validate_settings(bits if bits not in (None, 16, 32) else 4, group_size)
        chosen = Recipe(f"{base.bits}bit-g{group_size}", rule=lambda p, n, t, spec=base: spec,
                        notes={"bits_used": (base.bits,)})
        needs_model = True
    if not needs_model:
        return chosen
    text = _read_calibration(calibration)
    measured = _measurements(checkpoint, text)
    quantizer = DataAwareQuantizer(measured.importance()) if data_aware else None
    if target_bpw is not None:
        impact, shapes = measured.impacts(group_size, quantizer, progress)
        specs = allocate(shapes, impact, float(target_bpw), group_size)
        full = {p: specs.get(p) for p in measured.modules()}
        chosen = Recipe(f"target-{target_bpw}bpw", specs=full,
                        notes={"sensitivity": impact, "bpw": mean_bpw(shapes, specs),
                               "bits_used": tuple(sorted({s.bits for s in specs.values()}))})
    chosen.quantizer = quantizer
    if data_aware:
        chosen.name += "+data-aware"
    return chosen


__all__ = ["resolve_quantization", "reuse_measurements", "calibration_chunks", "default_calibration_text", "QuantSpec"]
