"""The checkpoint's own chat template, rendered with jinja2 the way transformers renders it.

Where the template comes from (as transformers 5 looks): ``chat_template.jinja``
next to the tokenizer, else ``chat_template`` in ``tokenizer_config.json`` (a
string, or a list of named templates of which ``default`` is used). The
environment is transformers' own: a sandboxed, immutable jinja2 environment
with ``trim_blocks``/``lstrip_blocks`` and loop controls, its ``tojson``
filter (no HTML escaping), ``raise_exception`` and ``strftime_now``; the
template sees ``messages``, ``add_generation_prompt``, ``tools`` and
``documents`` and the special tokens of ``tokenizer_config.json``
(``bos_token``, ``eos_token``, ...). tests/test_serve_units.py checks the
rendering against ``transformers.AutoTokenizer.apply_chat_template``.

A template from a checkpoint is untrusted code: the sandbox refuses
attribute access to Python internals, as in transformers.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """The checkpoint has no chat template, or rendering it failed (a 400 for the client)."""


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):  # a serialized AddedToken
        return value["content"]
    return None


class ChatTemplate:
    """A compiled chat template plus the special tokens it may reference."""

    def __init__(self, source: str, special_tokens: Mapping[str, str], origin: str) -> None:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.source = source
        self.origin = origin
        self.special_tokens = dict(special_tokens)

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        class TemplateNamespace(jinja2.utils.Namespace):
            """transformers' namespace: no underscore-prefixed attributes (no way to CPython internals)."""

            def __init__(*args, **kwargs):
                self_, args = args[0], args[1:]
                attrs = dict(*args, **kwargs)
                for name in attrs:
                    TemplateNamespace._check(name)
                jinja2.utils.Namespace.__init__(self_, attrs)

            def __setitem__(self_, name, value):
                TemplateNamespace._check(name)
                jinja2.utils.Namespace.__setitem__(self_, name, value)

            @staticmethod
            def _check(name):
                if isinstance(name, str) and name.startswith("_"):
                    raise jinja2.exceptions.SecurityError(f"a chat template may not set the attribute {name!r}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.globals["dict"] = lambda *args, **kwargs: dict(*args, **kwargs)
        env.globals["namespace"] = TemplateNamespace
        try:
            self.template = env.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as err:
            raise ChatTemplateError(f"the chat template in {origin} does not parse: {err}") from None

    @classmethod
    def load(cls, model_dir: str | Path) -> "ChatTemplate | None":
        """The template of a checkpoint directory, or None when it has none."""
        model_dir = Path(model_dir)
        config: dict[str, Any] = {}
        config_path = model_dir / "tokenizer_config.json"
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text())
            except json.JSONDecodeError as err:
                raise ChatTemplateError(f"{config_path} is not valid JSON: {err}") from None
        specials = {k: t for k in SPECIAL_TOKEN_KEYS if (t := _token_text(config.get(k))) is not None}
        jinja_path = model_dir / "chat_template.jinja"
        if jinja_path.is_file():
            return cls(jinja_path.read_text(), specials, str(jinja_path))
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: [{"name": "default", "template": "..."}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, Mapping)}
            source = named.get("default")
        if isinstance(source, str) and source:
            return cls(source, specials, str(config_path))
        return None

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               tools: Sequence[Mapping[str, Any]] | None = None, **extra: Any) -> str:
        import jinja2

        try:
            return self.template.render(messages=list(messages), tools=tools, documents=None,
                                        add_generation_prompt=add_generation_prompt,
                                        **{**self.special_tokens, **extra})
        except jinja2.exceptions.TemplateError as err:
            raise ChatTemplateError(f"the chat template ({self.origin}) refused the messages: {err}") from None
