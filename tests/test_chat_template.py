"""Chat templates: same text as transformers' apply_chat_template for real templates; unsafe or failing
templates and malformed messages become one-line GenerationErrors."""

from __future__ import annotations

import copy

import pytest

from mlxedge.errors import GenerationError
from mlxedge.generate.chat_template import normalize_messages, render_chat

# Meta-Llama-3-8B-Instruct's template, verbatim.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
    "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Gemma 3's text template (system folded into the first user turn; string or list-of-parts content).
GEMMA3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# A Qwen2.5-style template: tools as JSON, namespace, loop controls, strftime_now, {% generation %}.
QWEN_STYLE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}{{- messages[0].content }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}
    {{- "\\n\\n# Tools\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}{{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(first_user=-1) %}
{%- for message in messages %}
    {%- if message.role == 'user' and ns.first_user < 0 %}{%- set ns.first_user = loop.index0 %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'system' %}{% continue %}{% endif %}
    {%- if message.role == 'assistant' %}
        {{- '<|im_start|>assistant\\n' }}{% generation %}{{ message.content }}{% endgeneration %}{{ '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content }}
        {%- if loop.index0 == ns.first_user %}{{- ' [' + strftime_now('%Y') + ']' }}{% endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
    {%- if message.content == 'STOP' %}{% break %}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

CONVERSATION = [
    {"role": "system", "content": "You are terse. 한국어도 됩니다."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4. 🎉"},
    {"role": "user", "content": "  And 3+3?  \n"},
]
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add <a> & <b>",
                                           "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}}]


@pytest.fixture(scope="module")
def smol(smollm2_hf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_hf)


def transformers_render(tokenizer, messages, template=None, add_generation_prompt=True, **kwargs):
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **kwargs)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:], CONVERSATION[1:2]],
                         ids=["system+multiturn", "multiturn", "single"])
def test_smollm2_template_matches_transformers(smol, messages, add_generation_prompt):
    assert smol.chat_template and "<|im_start|>" in smol.chat_template
    expected = transformers_render(smol, messages, add_generation_prompt=add_generation_prompt)
    got = render_chat(smol.chat_template, messages, add_generation_prompt=add_generation_prompt,
                      bos_token=smol.bos_token, eos_token=smol.eos_token)
    assert got == expected


@pytest.mark.parametrize("name, template, bos", [("llama3", LLAMA3, "<|begin_of_text|>"),
                                                 ("gemma3", GEMMA3, "<bos>")])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_inline_real_templates_match_transformers(smol, name, template, bos, add_generation_prompt):
    for messages in (CONVERSATION, CONVERSATION[1:]):
        expected = transformers_render(smol, messages, template, add_generation_prompt, bos_token=bos)
        got = render_chat(template, messages, add_generation_prompt=add_generation_prompt, bos_token=bos)
        assert got == expected
        assert got.startswith(bos) and ("<start_of_turn>model\n" in got or name != "gemma3")


def test_gemma3_list_of_parts_content_matches_transformers(smol):
    messages = [{"role": "system", "content": [{"type": "text", "text": "Be kind."}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " Describe it. "}]}]
    expected = transformers_render(smol, messages, GEMMA3, bos_token="<bos>")
    assert render_chat(GEMMA3, messages, bos_token="<bos>") == expected
    assert "<start_of_image>Describe it." in expected


@pytest.mark.parametrize("tools", [None, TOOLS])
def test_template_helpers_match_transformers(smol, tools):
    """tojson (no HTML escaping), namespace, continue/break, strftime_now, {% generation %}, tools=None."""
    messages = CONVERSATION + [{"role": "assistant", "content": "6"}, {"role": "user", "content": "STOP"},
                               {"role": "user", "content": "never shown"}]
    expected = transformers_render(smol, messages, QWEN_STYLE, tools=tools)
    got = render_chat(QWEN_STYLE, messages, tools=tools)
    assert got == expected
    assert "never shown" not in got and "STOP<|im_end|>" in got and "What is 2+2? [2" in got
    assert ("Add <a> & <b>" in got) is (tools is not None)


def test_rendering_does_not_touch_the_callers_messages():
    messages = copy.deepcopy(CONVERSATION) + [{"role": "assistant", "content": "ok", "reasoning": "think"}]
    before = copy.deepcopy(messages)
    render_chat("{% for m in messages %}{{ m.reasoning_content }}{% endfor %}", messages)
    assert messages == before


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__ }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ raise_exception.__globals__ }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{% set ns = namespace(_secret=1) %}{{ ns }}",
    "{{ messages.append({'role': 'x'}) }}",
    "{{ dict.__call__.__globals__ }}",
])
def test_unsafe_templates_are_refused(template):
    with pytest.raises(GenerationError) as info:
        render_chat(template, CONVERSATION)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("template, words", [
    (GEMMA3, "alternate"),                                       # raise_exception from the template
    ("{% for m in messages %}{{ m.content + 1 }}{% endfor %}", "TypeError"),  # a template bug
    ("{% for m in messages %}{{ m.content }", "syntax error"),   # does not parse
    ("   ", "empty"),
])
def test_failing_templates_raise_one_line_generation_error(template, words):
    bad_turns = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(GenerationError) as info:
        render_chat(template, bad_turns)
    message = str(info.value)
    assert words in message and "\n" not in message


def test_normalize_messages_accepts_prompts_and_valid_lists():
    assert normalize_messages("hi") == [{"role": "user", "content": "hi"}]
    assert normalize_messages(CONVERSATION) == CONVERSATION
    assert normalize_messages(CONVERSATION) is not CONVERSATION
    assert normalize_messages(tuple(CONVERSATION[:1])) == CONVERSATION[:1]
    parts = [{"role": "user", "content": [{"type": "text", "text": "x"}]}]
    assert normalize_messages(parts) == parts
    tool_call = [{"role": "assistant", "content": None, "tool_calls": [{"name": "add"}]}]
    assert normalize_messages(tool_call) == tool_call


@pytest.mark.parametrize("bad, words", [
    (None, "string or a list"),
    (42, "string or a list"),
    ([], "empty"),
    (["hi"], "message 0"),
    ([{"content": "hi"}], "role"),
    ([{"role": "", "content": "hi"}], "role"),
    ([{"role": "user"}], "content"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": 3}], "message 1"),
    ([{"role": "assistant", "content": None}], "tool_calls"),
])
def test_normalize_messages_rejects_malformed_input(bad, words):
    with pytest.raises(GenerationError) as info:
        normalize_messages(bad)
    assert words in str(info.value) and "\n" not in str(info.value)
