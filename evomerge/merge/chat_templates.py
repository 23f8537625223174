"""`chat_template:` of a mergekit recipe: "auto" (the template most of the models carry), a named template
(mergekit 0.1.5's names: alpaca, chatml, exaone, llama3, mistral), or a Jinja string written as is.

The named templates are written here from each format's public description (not copied from mergekit);
their rendered prompts follow the same format, though whitespace details may differ from mergekit's files.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from evomerge.errors import RecipeError

NAMED: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "alpaca": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + "
        "'\\n\\n' }}{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + "
        "message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + "
        "eos_token }}{% elif message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
    ),
    "exaone": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ '[|system|]' + message['content'] + "
        "'[|endofturn|]\\n' }}{% elif message['role'] == 'user' %}{{ '[|user|]' + message['content'] + '\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '[|assistant|]' + message['content'] + '[|endofturn|]\\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
}


def resolve_chat_template(value: str, model_templates: Iterable[str | None], where: str) -> str | None:
    """The template text to write, or None ("auto" where no model has one: the tokenizer is left as it is).
    model_templates: the models' own templates, in recipe order (ties go to the first)."""
    if value == "auto":
        found = [t.strip() for t in model_templates if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if value in NAMED:
        return NAMED[value]
    if len(value) < 20 or "{" not in value:
        raise RecipeError(f"{where}: chat_template {value!r} is not 'auto', a known template "
                          f"({', '.join(sorted(NAMED))}) or a Jinja template string")
    return value
