"""How much memory a model needs, how much the device gives, and what to do when it does not fit.

- `memory.units`:  size parsing and formatting ("6GB" in, "1.23 GB" out).
- `memory.budget`: the device's budget, one probe per platform (macOS Metal, Linux meminfo + cgroup).
- `memory.plan`:   the arithmetic: weights, KV cache, activations, runtime overhead against a budget.
- `memory.fit`:    the policy: refuse naming settings that fit, or auto-fit the best of them.

Import the module you need; nothing is re-exported here. Keeping a generation within its plan (the context
guard, the wired limit) lives next to the generation loop, in generate/guards.py.
"""
