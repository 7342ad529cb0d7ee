"""Chat templates render as transformers' apply_chat_template does; harmony output is split;
the converter copies templates; rendered prompts encode with their special tokens."""

from __future__ import annotations

import json
import os

import pytest

from checkpoints_tools import convert_hf, default_model
from lazymoe_jax import tokenizer as tokenizer_lib
from lazymoe_jax.server import templates

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

# Templates written in the shape of the published families' (the constructs they use), not
# copies of them: ChatML with Qwen3's thinking switch, tools and reasoning split; Mixtral's
# [INST] with bos/eos and raise_exception; DeepSeek-V3's namespace and full-width markers;
# gpt-oss harmony with strftime_now, channels and `thinking`.
QWEN3 = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
    {{- "# Tools\\n<tools>" }}
    {%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- if message.role == "user" and ns.last_query_index == messages|length - 1 %}
        {%- set ns.last_query_index = (messages|length - 1) - loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].split('<think>')[-1] %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and reasoning_content %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') +
                '\\n</think>\\n\\n' + content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

MIXTRAL = """\
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- endif %}
{%- endfor %}"""

DEEPSEEK_V3 = """\
{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}
{% set ns = namespace(is_first=false, is_tool=false, system_prompt='', is_first_sp=true) %}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}
        {%- if ns.is_first_sp %}
            {% set ns.system_prompt = ns.system_prompt + message['content'] %}
            {% set ns.is_first_sp = false %}
        {%- else %}
            {% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{{ bos_token }}{{ ns.system_prompt }}
{%- if tools %}{{ '\\n\\n## Tools\\n' }}{% for t in tools %}{{ t | tojson(indent=2) }}{% endfor %}
{%- endif %}
{%- for message in messages %}
    {%- if message['role'] == 'user' %}
        {{ '<｜User｜>' + message['content'] }}
    {%- elif message['role'] == 'assistant' %}
        {{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}
    {%- endif %}
{%- endfor %}
{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"""

GPT_OSS = """\
{%- macro render_system(effort) -%}
{{- "You are ChatGPT, a large language model trained by OpenAI.\\n" }}
{{- "Current date: " + strftime_now("%Y") + "\\n\\nReasoning: " + effort + "\\n\\n" }}
{{- "# Valid channels: analysis, commentary, final. Channel must be included for every message." }}
{%- endmacro -%}
{%- if reasoning_effort is not defined %}{%- set reasoning_effort = "medium" %}{%- endif %}
{{- "<|start|>system<|message|>" }}{{- render_system(reasoning_effort) }}{{- "<|end|>" }}
{%- if messages[0].role in ("system", "developer") %}
    {{- "<|start|>developer<|message|># Instructions\\n\\n" + messages[0].content + "<|end|>" }}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- for message in loop_messages -%}
    {%- if message.role == 'assistant' -%}
        {%- if "thinking" in message and loop.last %}
            {{- "<|start|>assistant<|channel|>analysis<|message|>" + message.thinking + "<|end|>" }}
        {%- endif %}
        {{- "<|start|>assistant<|channel|>final<|message|>" + message.content + "<|end|>" }}
    {%- elif message.role == 'user' -%}
        {{- "<|start|>user<|message|>" + message.content + "<|end|>" }}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}<|start|>assistant{%- endif -%}"""

DEMO = open(os.path.join(default_model.DEMO_DIR, "chat_template.jinja")).read()

CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi <there> & \"friends\""},
        {"role": "assistant", "content": "<think>\nplan\n</think>\n\nHello.",
         "tool_calls": None},
        {"role": "user", "content": "Write fib in Python. ünïcode ✓"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather <now>",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}}}}}]

CASES = [
    ("qwen3", QWEN3, CHAT, {}, None),
    ("qwen3-no-thinking", QWEN3, CHAT, {"enable_thinking": False}, None),
    ("qwen3-tools", QWEN3, CHAT, {}, TOOLS),
    ("qwen3-reasoning-field", QWEN3, CHAT[:2] + [{"role": "assistant", "content": "Hello.",
                                                 "reasoning_content": "plan"}], {}, None),
    ("mixtral", MIXTRAL, CHAT, {}, None),
    ("deepseek_v3", DEEPSEEK_V3, CHAT, {}, TOOLS),
    ("gpt_oss", GPT_OSS, CHAT, {"reasoning_effort": "high"}, None),
    ("gpt_oss-thinking", GPT_OSS, CHAT[:2] + [{"role": "assistant", "content": "Hello.",
                                               "reasoning_content": "plan"}], {}, None),
    ("demo", DEMO, CHAT, {}, None),
]


def _hf_tokenizer(template: str):
  vocab = {"<s>": 0, "</s>": 1, "<unk>": 2}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                              eos_token="</s>", unk_token="<unk>",
                                              chat_template=template)


@pytest.mark.parametrize("gen_prompt", [True, False])
@pytest.mark.parametrize("name,source,messages,kwargs,tools", CASES, ids=[c[0] for c in CASES])
def test_renders_as_transformers(name, source, messages, kwargs, tools, gen_prompt):
  del name
  want = _hf_tokenizer(source).apply_chat_template(
      messages, tools=tools, tokenize=False, add_generation_prompt=gen_prompt, **kwargs)
  ours = templates.ChatTemplate(source, {"bos_token": "<s>", "eos_token": "</s>"})
  assert ours.render(messages, add_generation_prompt=gen_prompt, tools=tools, **kwargs) == want


def test_raise_exception_and_bad_templates_are_clear():
  t = templates.ChatTemplate(MIXTRAL, {"bos_token": "<s>", "eos_token": "</s>"})
  with pytest.raises(templates.TemplateError, match="roles must alternate"):
    t.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
  with pytest.raises(templates.TemplateError, match="does not parse"):
    templates.ChatTemplate("{% for %}")
  with pytest.raises(templates.TemplateError):  # the sandbox refuses internals
    templates.ChatTemplate("{{ messages.__class__.__mro__ }}").render([])


def test_harmony_split_whatever_the_pieces():
  out = ("<|channel|>analysis<|message|>Think <b>about</b> it.<|end|><|start|>assistant"
         "<|channel|>final<|message|>The answer: 42 <|x|>.")
  for size in (1, 2, 3, 5, 7, 11, len(out)):
    p = templates.HarmonyParser()
    reasoning, content = "", ""
    for i in range(0, len(out), size):
      r, c = p.push(out[i:i + size])
      reasoning, content = reasoning + r, content + c
    r, c = p.flush()
    assert (reasoning + r, content + c) == ("Think <b>about</b> it.", "The answer: 42 <|x|>.")


def test_converter_copies_the_template(tmp_path):
  src, dst = tmp_path / "src", tmp_path / "dst"
  src.mkdir()
  dst.mkdir()
  (src / "tokenizer_config.json").write_text(json.dumps({
      "bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>",
      "chat_template": [{"name": "tool_use", "template": "T"},
                        {"name": "default", "template": MIXTRAL}]}))
  info = convert_hf._chat_template(str(src), str(dst))  # pylint: disable=protected-access
  assert info == {"file": "chat_template.jinja", "bos_token": "<s>", "eos_token": "</s>"}
  assert (dst / "chat_template.jinja").read_text() == MIXTRAL
  (src / "chat_template.jinja").write_text(QWEN3)  # the file wins, as in transformers
  convert_hf._chat_template(str(src), str(dst))  # pylint: disable=protected-access
  assert (dst / "chat_template.jinja").read_text() == QWEN3
  copy = convert_hf._chat_template  # pylint: disable=protected-access
  assert copy(str(tmp_path), str(dst)) is None


def test_demo_store_has_its_template_and_special_tokens_encode(demo_store):
  from lazymoe_jax.store import format as fmt  # pylint: disable=import-outside-toplevel
  manifest = fmt.read_manifest(demo_store)
  tok = tokenizer_lib.load(demo_store, manifest["tokenizer"], 1)
  t = templates.load_store_template(demo_store, manifest, tok)
  assert t.source == DEMO and t.special_tokens["bos_token"] == "<s>"
  ids = templates.encode_rendered(tok, "<s>def f():</s>", t.special_tokens)
  assert ids[0] == tok.sp.bos_id() and ids[-1] == tok.sp.eos_id()
  assert ids[1:-1] == tok.sp.encode("def f():")


@pytest.mark.parametrize("out,want", [
    ("<think>\nStep 1 < 2.\n</think>\n\nThe answer.", ("\nStep 1 < 2.\n", "The answer.")),
    ("No thinking here <think>x</think>", ("", "No thinking here <think>x</think>")),
    ("<thin", ("", "<thin")),
    ("<think>cut off", ("cut off", "")),
])
def test_think_split_whatever_the_pieces(out, want):
  for size in (1, 2, 3, 5, len(out)):
    p = templates.ThinkParser()
    reasoning, content = "", ""
    for i in range(0, len(out), size):
      r, c = p.push(out[i:i + size])
      reasoning, content = reasoning + r, content + c
    r, c = p.flush()
    assert (reasoning + r, content + c) == want
  t = templates.ChatTemplate(QWEN3)
  assert isinstance(t.output_parser(), templates.ThinkParser)
  assert isinstance(templates.ChatTemplate(GPT_OSS).output_parser(), templates.HarmonyParser)
  assert templates.ChatTemplate(MIXTRAL).output_parser() is None
