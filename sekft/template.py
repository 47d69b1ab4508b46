"""Render chat sessions with a model's own chat template, exactly as transformers does.

`ChatTemplate.render(messages, add_generation_prompt)` equals transformers'
`tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` byte for
byte: the same sandboxed jinja2 environment (trim_blocks, lstrip_blocks, loop controls), the
same globals and filters (`raise_exception`, `strftime_now`, `tojson(ensure_ascii=False, ...)`,
`dict`, `namespace`), the named special tokens passed as template variables, `tools` and
`documents` passed as None, and message keys whose value is None dropped.

`normalize_for_template` is the canonical form sekft trains on; a server must apply it too.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from sekft.errors import ConfigError, TemplateError
from sekft.tokenizer import load_special_tokens, read_json

# Special tokens that close a turn in the templates sekft knows; the eos token is added per model.
END_OF_TURN_TOKENS = ("</s>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")

# What joins two merged turns, and what joins a folded system turn to the first user turn.
TURN_JOINER = "\n"
SYSTEM_JOINER = "\n\n"


class GenerationTag(jinja2.ext.Extension):
    """Accept transformers' `{% generation %}...{% endgeneration %}` and render its body as is."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def tojson(x: object, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # jinja's own tojson escapes HTML characters; transformers replaces it with plain json.dumps.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class TemplateDict:
    """`dict(...)` for templates without exposing the dict type itself to the sandbox."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class TemplateNamespace(jinja2.utils.Namespace):
    """jinja's namespace, refusing underscore attributes (as transformers does)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            TemplateNamespace.check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        TemplateNamespace.check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore attributes on a namespace: {name!r}"
            )


class Sandbox(ImmutableSandboxedEnvironment):
    """jinja's immutable sandbox, with its attribute-safety verdicts memoized.

    The verdict depends only on the object's type, the attribute name and the value's type
    (jinja checks isinstance against fixed type lists and the name), so caching on those is
    exact; it saves most of a render's time on templates that read `loop.first` per message.
    """

    def __init__(self, **options):
        super().__init__(**options)
        self.safe_attributes: dict[tuple[type, str, type], bool] = {}

    def is_safe_attribute(self, obj, attr, value) -> bool:
        key = (type(obj), attr, type(value))
        verdict = self.safe_attributes.get(key)
        if verdict is None:
            verdict = self.safe_attributes[key] = super().is_safe_attribute(obj, attr, value)
        return verdict


@lru_cache(maxsize=64)
def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template source once; later calls with the same source reuse it."""
    env = Sandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TemplateError(
            f"chat template line {e.lineno}: {e.message}; fix the template or pick another"
        ) from e


def template_messages(messages: Sequence[Mapping]) -> list[Mapping]:
    """`messages` as the template sees them: keys whose value is None dropped (as transformers).

    Messages without None values are passed as they are: the immutable sandbox keeps the
    template from changing them.
    """
    return [
        {k: v for k, v in m.items() if v is not None} if None in m.values() else m
        for m in messages
    ]


class ChatTemplate:
    """A compiled chat template plus the special tokens it is rendered with.

    `special_tokens` are the named tokens ({"bos_token": "<s>", ...}); `clock` gives the time
    `strftime_now` formats (Llama 3.x writes today's date), so tests and long runs can fix it.
    `variables` are passed to every render, as a server passes a request's
    `chat_template_kwargs` ({"enable_thinking": False} for Qwen3's non-thinking mode).
    """

    def __init__(
        self,
        source: str,
        special_tokens: Mapping[str, str] | None = None,
        clock: Callable[[], datetime] = datetime.now,
        variables: Mapping[str, object] | None = None,
    ):
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self.clock = clock
        self.variables = dict(variables or {})
        self.compiled = compile_template(source)
        self.globals = dict(self.compiled.globals)
        eos = self.special_tokens.get("eos_token")
        known = [t for t in END_OF_TURN_TOKENS if t in source]
        self.end_of_turn_strings: tuple[str, ...] = tuple(
            dict.fromkeys(known + ([eos] if eos else []))
        )

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        name: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
    ) -> ChatTemplate:
        """The chat template saved in `folder` (or a `.jinja`, `tokenizer_config.json` or
        `chat_template.json` file).

        Looks where transformers looks: `chat_template.jinja` and
        `additional_chat_templates/*.jinja` first, else `tokenizer_config.json`'s
        `chat_template` (a string or a list of named templates), else a processor's
        `chat_template.json` (see `find_templates`). `name` picks a named template; without it
        the default one. Special tokens come from the folder unless given.
        """
        path = Path(folder)
        templates = find_templates(path)
        token_folder = path if path.is_dir() else path.parent
        if special_tokens is None:
            special_tokens = load_special_tokens(token_folder)
        if not templates:
            raise TemplateError(
                f"{path}: no chat template (chat_template.jinja, tokenizer_config.json "
                "'chat_template' or chat_template.json); pass --template with the model's template"
            )
        wanted = name or "default"
        if wanted not in templates:
            if name is None and len(templates) == 1:
                wanted = next(iter(templates))
            else:
                raise TemplateError(
                    f"{path}: no chat template named {wanted!r}; available: {sorted(templates)}"
                )
        return cls(templates[wanted], special_tokens)

    def render(
        self, messages: Sequence[Mapping], add_generation_prompt: bool = False, **variables
    ) -> str:
        """The template's text for `messages`; raises TemplateError naming the turn it fails at."""
        try:
            return self.render_raw(messages, add_generation_prompt, **variables)
        except (jinja2.exceptions.TemplateError, TypeError, ValueError, KeyError) as e:
            turn = self.failing_turn(messages, **variables)
            if turn < len(messages):
                where = f"turn {turn} (role {messages[turn].get('role')!r})"
            else:
                where = "the generation prompt"
            hint = failure_hint(messages)
            raise TemplateError(f"chat template failed at {where}: {e}; {hint}") from e

    def render_raw(
        self, messages: Sequence[Mapping], add_generation_prompt: bool = False, **variables
    ) -> str:
        """`render` without the error translation: jinja's exceptions propagate."""
        context = {
            **self.globals,
            "strftime_now": self.strftime_now,
            "tools": None,
            "documents": None,
            **self.special_tokens,
            **self.variables,
            **variables,
            "messages": template_messages(messages),
            "add_generation_prompt": add_generation_prompt,
        }
        # What Template.render does, minus copying the environment's globals on every call:
        # they are already in `context` (a render per prefix makes that copy add up).
        return "".join(self.compiled.root_render_func(self.compiled.new_context(context, True)))

    def strftime_now(self, format: str) -> str:
        return self.clock().strftime(format)

    def failing_turn(self, messages: Sequence[Mapping], **variables) -> int:
        """Index of the first message whose inclusion makes the render fail (len if none does)."""
        for end in range(1, len(messages) + 1):
            try:
                self.render_raw(messages[:end], False, **variables)
            except Exception:
                return end - 1
        return len(messages)


def parse_template_vars(items: Sequence[str], flag: str = "--template-var") -> dict[str, object]:
    """`KEY=VALUE` strings as template variables: VALUE read as JSON when it parses (`false`,
    `3`, `"x"`, `[1]`), else taken as the string it is. A later KEY wins.

    Raises ConfigError naming `flag` for an item without `=` or with an empty or reserved KEY
    (the messages, the generation prompt and special tokens are sekft's to set).
    """
    reserved = {"messages", "add_generation_prompt"}
    variables: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier() or key in reserved or key.endswith("_token"):
            raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE with KEY a template variable "
                              "(e.g. enable_thinking=false); messages, add_generation_prompt and "
                              "*_token are set by sekft")
        try:
            variables[key] = json.loads(value)
        except json.JSONDecodeError:
            variables[key] = value
    return variables


def find_templates(path: Path) -> dict[str, str]:
    """All chat templates saved at `path` (folder or file), by name; "default" is the main one.

    A folder is read as transformers' tokenizer reads it (`tokenizer_templates`). A processor's
    `chat_template.json` ({"chat_template": ...}) is the fallback: multimodal checkpoints (Gemma
    3 4B and up) ship their template only there, and servers read it through the processor.
    When both exist and their default templates differ, which one a server renders with
    depends on whether it loads a processor, so the folder is refused (pass --template).
    A file is read by its kind: `.jinja` is the template itself, any other is JSON with a
    `chat_template` field (tokenizer_config.json, chat_template.json).
    """
    if path.is_file():
        if path.suffix == ".jinja":
            return {"default": path.read_text(encoding="utf-8")}
        return config_templates(path)
    templates = tokenizer_templates(path)
    processor_file = path / "chat_template.json"
    if not processor_file.is_file():
        return templates
    processor = config_templates(processor_file)
    if not templates:
        return processor
    if processor.get("default", templates.get("default")) != templates.get("default"):
        raise TemplateError(
            f"{path}: chat_template.json and the tokenizer's template (chat_template.jinja or "
            "tokenizer_config.json) differ, and a server may render with either; pass "
            "--template with the file the server uses"
        )
    return templates


def tokenizer_templates(folder: Path) -> dict[str, str]:
    """The templates transformers' tokenizer loads from `folder`: `chat_template.jinja` and
    `additional_chat_templates/*.jinja`, else `tokenizer_config.json`'s `chat_template`."""
    templates: dict[str, str] = {}
    if (folder / "chat_template.jinja").is_file():
        templates["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    extra = folder / "additional_chat_templates"
    if extra.is_dir():
        for file in sorted(extra.glob("*.jinja")):
            templates[file.stem] = file.read_text(encoding="utf-8")
    if templates:
        return templates
    config = folder / "tokenizer_config.json"
    return config_templates(config) if config.is_file() else {}


def config_templates(config_path: Path) -> dict[str, str]:
    """The `chat_template` field of a tokenizer_config.json, as {name: source}."""
    value = read_json(config_path).get("chat_template")
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    def named(t: object) -> bool:
        return isinstance(t, dict) and all(isinstance(t.get(k), str) for k in ("name", "template"))

    if isinstance(value, list) and all(named(t) for t in value):
        return {t["name"]: t["template"] for t in value}
    raise TemplateError(
        f"{config_path}: field 'chat_template' must be a string or a list of "
        "{'name', 'template'} objects"
    )


def failure_hint(messages: Sequence[Mapping]) -> str:
    """What to look at when a template raises on `messages`: the session's form when it is not
    normalized, else what the template needs beyond the messages (a tool-use template iterates
    `tools`, which sekft passes as None, and fails at the first turn whatever it holds)."""
    if not is_normalized(messages):
        return ("most templates need the session normalized: normalize_for_template folds "
                "system and merges same-role turns")
    return ("the session is already normalized, so the template refuses its turns as they are "
            "(a later system turn is left to it), or needs variables sekft does not pass (tools "
            "and documents are None), or is not the model's plain-chat template (--template-name)")


def is_normalized(messages: Sequence[Mapping]) -> bool:
    """True when `normalize_for_template` would leave the roles and contents of `messages` as
    they are (False for messages it cannot read)."""
    try:
        normalized = normalize_for_template(messages)
    except (KeyError, TypeError, AttributeError):
        return False
    return [(m["role"], m["content"]) for m in normalized] == [
        (m.get("role"), m.get("content")) for m in messages
    ]


def join_contents(first: str, second: str, joiner: str) -> str:
    """`first` + `joiner` + `second`, without the joiner when either side is empty."""
    if not first:
        return second
    if not second:
        return first
    return first + joiner + second


def normalize_for_template(messages: Sequence[Mapping]) -> list[dict]:
    """The canonical session sekft trains on, and a server must send: [{role, content}, ...].

    Rules, in order:
    1. consecutive turns with the same role merge into one, contents joined by TURN_JOINER
       ("\\n") — e.g. two environment outputs in a row become one user turn;
    2. a leading `system` turn folds into the first `user` turn after it, as
       system + SYSTEM_JOINER ("\\n\\n") + user; with no user turn after it, it becomes a user
       turn itself.
    An empty content joins without a joiner. Only `role` and `content` are kept, and
    `weight: 0` on an assistant turn that must not train (a merged turn keeps it if any part
    had it: what was marked untrained never trains); later `system` turns are left for the
    template to handle. The result is a fixed point: normalizing it again changes nothing.
    """
    merged: list[dict] = []
    for message in messages:
        role, content = message["role"], message["content"]
        if merged and merged[-1]["role"] == role:
            merged[-1]["content"] = join_contents(merged[-1]["content"], content, TURN_JOINER)
        else:
            merged.append({"role": role, "content": content})
        if role == "assistant" and message.get("weight", 1) == 0:
            merged[-1]["weight"] = 0
    if not merged or merged[0]["role"] != "system":
        return merged
    system, rest = merged[0], merged[1:]
    if rest and rest[0]["role"] == "user":
        content = join_contents(system["content"], rest[0]["content"], SYSTEM_JOINER)
        return [{"role": "user", "content": content}, *rest[1:]]
    return [{"role": "user", "content": system["content"]}, *rest]
