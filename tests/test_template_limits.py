"""Chat template rendering is bounded (range, sizes, time) and ordinary templates render exactly as before.

"Before" is transformers' own renderer, which mlxedge matched before the limits (test_chat_template.py):
templates in the style of the seven architectures (llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3) and
SmolLM2's real one, over short and long conversations, must still give identical text. The hostile ones
must end in a few seconds with a one-line GenerationError that names the limit.
"""

from __future__ import annotations

import threading
import time

import pytest

from mlxedge.errors import GenerationError
from mlxedge.generate import template_sandbox as sandbox
from mlxedge.generate.chat_template import render_chat
from test_chat_template import CONVERSATION, GEMMA3, LLAMA3, QWEN_STYLE, TOOLS, smol, transformers_render  # noqa: F401 (fixture)

# Written for these tests in the style of each family's published template (system handling, role
# alternation checks, eos after assistant turns, thinking blocks, tools), not copied from a model card.
MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate user/assistant') }}"
    "{%- endif %}{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported') }}{%- endif %}{%- endfor %}"
)

GEMMA2 = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{% continue %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

QWEN3 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
    {{- "# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string %}
        {%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}{%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and reasoning_content %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
        {%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}"""

ALTERNATING = [m for m in CONVERSATION if m["role"] != "system"]
SEVEN = {  # name: (template, bos, eos, conversation it accepts)
    "llama": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", CONVERSATION),
    "mistral": (MISTRAL, "<s>", "</s>", CONVERSATION),
    "qwen2": (QWEN_STYLE, "", "<|im_end|>", CONVERSATION),
    "qwen3": (QWEN3, "", "<|im_end|>", CONVERSATION + [{"role": "assistant", "content": "<think>\nsum\n</think>\n\n6"},
                                                     {"role": "user", "content": "ok"}]),
    "gemma2": (GEMMA2, "<bos>", "<eos>", CONVERSATION),
    "gemma3": (GEMMA3, "<bos>", "<eos>", CONVERSATION),
    "phi3": (PHI3, "<s>", "<|endoftext|>", CONVERSATION),
}


def long_conversation(turns: int, words: int) -> list:
    text = " ".join(f"word{i}" for i in range(words))
    chat = [{"role": "system", "content": "Be brief. " + text}]
    for i in range(turns):
        chat += [{"role": "user", "content": f"question {i}: {text}"}, {"role": "assistant", "content": f"answer {i}"}]
    return chat + [{"role": "user", "content": "last question"}]


@pytest.mark.parametrize("name", sorted(SEVEN))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_ordinary_templates_render_exactly_as_before(smol, name, add_generation_prompt):
    template, bos, eos, conversation = SEVEN[name]
    for messages, extra in ((conversation, {}), (ALTERNATING, {}), (conversation, {"tools": TOOLS}),
                            (conversation, {"enable_thinking": False})):
        expected = transformers_render(smol, messages, template, add_generation_prompt, bos_token=bos,
                                       eos_token=eos, **extra)
        got = render_chat(template, messages, add_generation_prompt=add_generation_prompt, bos_token=bos,
                          eos_token=eos, **extra)
        assert got == expected, (name, extra)


def test_long_conversations_are_not_mistaken_for_attacks(smol):
    """The size limit grows with the conversation: ~3 MB of history renders, through every template."""
    messages = long_conversation(turns=40, words=8000)  # ~2.9 MB of text, well past MIN_SIZE_LIMIT
    assert sum(len(m["content"]) for m in messages) > 2 * sandbox.MIN_SIZE_LIMIT
    for name, (template, bos, eos, _) in SEVEN.items():
        expected = transformers_render(smol, messages, template, True, bos_token=bos, eos_token=eos)
        assert render_chat(template, messages, bos_token=bos, eos_token=eos) == expected, name
    real = smol.chat_template
    assert render_chat(real, messages) == transformers_render(smol, messages)


def rendering_error(template: str, seconds: float = 30.0) -> tuple:
    start = time.monotonic()
    with pytest.raises(GenerationError) as e:
        render_chat(template, [{"role": "user", "content": "hi"}])
    elapsed = time.monotonic() - start
    message = str(e.value)
    assert "\n" not in message and message.startswith("chat template stopped at a rendering limit: ")
    assert elapsed < seconds, f"took {elapsed:.1f} s"
    return message, elapsed


HOSTILE = {
    "{% for i in range(10**10) %}x{% endfor %}": "a range of 10,000,000,000 items (the limit is 100,000)",
    "{{ 'a' * 10**9 }}": "a string length of 1,000,000,000 (the limit is 1,000,000)",
    "{{ [0] * 10**9 }}": "a list length of 1,000,000,000 (the limit is 1,000,000)",
    "{{ 'x'.center(10**9) }}": "str.center width of 1,000,000,000",
    "{{ 'x'|center(10**9) }}": "center width of 1,000,000,000",
    "{{ '{:>1000000000}'.format(1) }}": "a format width of 1,000,000,000",
    "{{ '{:>1000000000}'['format'](1) }}": "a format width of 1,000,000,000",
    "{{ '%1000000000s' % 'x' }}": "a format width of 1,000,000,000",
    "{{ '%1000000000s'|format('x') }}": "a format width of 1,000,000,000",  # jinja folds this at compile time
    "{{ 7 ** 1000000000 }}": "7 ** 1000000000 is too large",
    "{% set s = 'a' * 100000 %}{{ s.replace('a', s) }}": "str.replace result length of 10,000,000,000",
    "{% set s = 'a' * 100000 %}{{ s|replace('a', s) }}": "str.replace result length of 10,000,000,000",
    "{% set s = 'a' * 100000 %}{{ range(100000)|map('string')|join(s) }}": "str.join result length",
    "{% set s = 'a' * 100000 %}{{ s.join(range(100000)|map('string')) }}": "str.join result length",
    "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}":
        "a string length of 1,048,576",
    "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}":
        "a string length of 1,048,576",
    "{% set s = 'a' * 900000 %}{% set x %}{% for i in range(100000) %}{{ s }}{% endfor %}{% endset %}":
        "a block length of 90,000,000,000",
    "{% macro f(s, n) %}{% if n %}{{ f(s ~ s, n - 1) }}{% endif %}{% endmacro %}{{ f('ab', 60) }}":
        "a string length of 1,048,576",
    "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}":
        "output longer than 1,000,000 characters",
    "{{ lipsum(10**7) }}": "lipsum text length",
}


@pytest.mark.parametrize("template", sorted(HOSTILE))
def test_hostile_templates_stop_at_once_with_the_limit_named(template):
    message, _ = rendering_error(template, seconds=sandbox.TIME_LIMIT_S)
    assert HOSTILE[template] in message, message


def test_a_loop_that_builds_nothing_is_stopped_by_the_clock(monkeypatch):
    monkeypatch.setattr(sandbox, "TIME_LIMIT_S", 1.0)
    template = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    message, elapsed = rendering_error(template)
    assert "rendering took longer than 1 s (a runaway loop?)" in message
    assert 0.9 < elapsed < 20


def test_the_clock_also_stops_a_runaway_render_on_a_worker_thread(monkeypatch):
    monkeypatch.setattr(sandbox, "TIME_LIMIT_S", 1.0)
    outcome = {}

    def worker():
        try:
            render_chat("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                        [{"role": "user", "content": "hi"}])
        except GenerationError as e:
            outcome["error"] = str(e)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(30)
    assert not thread.is_alive() and "rendering took longer than 1 s" in outcome["error"]


def test_a_finished_render_leaves_no_pending_timeout_behind(monkeypatch):
    monkeypatch.setattr(sandbox, "TIME_LIMIT_S", 0.2)
    for _ in range(20):
        assert render_chat(PHI3, CONVERSATION).endswith("<|assistant|>\n")
    time.sleep(0.5)  # any leftover watchdog would have raised here, in this thread
    total = 0
    for i in range(2_000_000):  # plain Python after the renders: interrupted if an exception were pending
        total += i
    assert total == 1999999000000
