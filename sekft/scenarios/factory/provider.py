"""Rendering a family's provider: the tool (bash or python3) and its documentation.

Every provider has one action, `NAME [VERB] FIELDS...`, whose fields are given in the
family's grammar:

    positional   NAME add ITEM COUNT
    options      NAME add --item ITEM --count COUNT          (any order)
    keyvalue     NAME add item=ITEM count=COUNT              (any order)
    stdin        echo COUNT | NAME add ITEM                  (the last field on stdin)

plus the confirmation flag when the family has one. A provider with subcommands may also
have read-only siblings: `NAME LISTER` prints the state file's lines, `NAME STATUS` what
the gate looks at (the token's presence, the quota left, the writers list).

A text field's value is recorded as given; a file field names a file whose contents the
tool keeps (on stdin: the contents). A well-formed call appends its line (the values, a
file by its base name, "-" for stdin) to `attempts`, then passes the gate of the family's
blocker (an API token in ~/.config/NAME/token, a quota left, the user on the writers list)
or refuses; past the gate it keeps the files under `files/`, appends the line to the
family's state file, which check.sh reads, and replies in the family's way
(`spec.REPLIES`). A wrong call names what is wrong and where the documentation is (in the
`usage` doc style: prints the documentation itself).

Both languages implement exactly this behaviour from the same settings, so the language
is invisible to the model unless it reads the script.
"""

from __future__ import annotations

import json

from sekft.scenarios.factory.spec import FamilySpec
from sekft.scenarios.world import text

DOC_DIR = "/usr/local/share/doc"
SUMMARIES = {
    "record": ("keep a record of values", "record values by name", "a small value register"),
    "count": ("collect counts", "report counted totals", "a tally of counts"),
    "lines": ("collect files", "hand in files", "a drop box for files"),
    "transform": ("collect files", "hand in prepared files", "a drop box for results"),
    "copy": ("keep track of files", "register files", "a register of files"),
    "move": ("keep track of files", "register files", "a register of files"),
    "rename": ("keep track of files", "register files", "a register of files"),
    "send": ("send files to people", "deliver files to people", "a file courier"),
}
HINTS = {
    "help": ("see {name} --help", "try '{name} --help'", "run {name} --help for usage"),
    "h": ("see {name} -h", "try '{name} -h'", "run {name} -h for usage"),
    "helpcmd": ("see {name} help", "try '{name} help'", "run {name} help for usage"),
    "man": ("see the manual: man {name}", "documented in man {name}", "read man {name}"),
    "readme": ("documentation: {readme}", "see {readme}", "read {readme} for usage"),
    "usage": ("", "", ""),
}
# What the action does, for a table of commands; {role} stands for the field's label.
ACTIONS = {
    "record": "record {value} under {key}",
    "count": "report {count} for {key}",
    "lines": "hand in {file}",
    "transform": "hand in {file}",
    "copy": "register {file}",
    "move": "register {file}",
    "rename": "register {file}",
    "send": "send {file} to {person}",
}
LISTS = ("list every record", "show what has been recorded", "print the records kept so far")
STATUS_TEXTS = {
    "credential": "show whether your API token is in place",
    "quota": "show the quota you have left",
    "permission": "show who may write",
}
PAST = {"add": "added", "record": "recorded", "set": "set", "log": "logged",
        "submit": "submitted", "report": "reported", "count": "counted", "enter": "entered",
        "put": "put", "upload": "uploaded", "store": "stored", "file": "filed",
        "register": "registered", "track": "tracked", "note": "noted", "claim": "claimed",
        "send": "sent", "deliver": "delivered", "share": "shared", "mail": "mailed"}
MEANINGS = {
    "key": "the name to record it under",
    "value": "the value, a whole number",
    "count": "the total, a whole number",
    "file": "the file to hand in",
    "person": "who receives it",
}
BLOCKER_NOTES = {
    "credential": "Needs an API token in ~/.config/{name}/token; only the administrator "
                  "issues tokens.",
    "quota": "Every call counts against your quota; only support can raise it.",
    "permission": "Only users on the writers list may use it; the owner keeps the list.",
}
REFUSALS = {
    "credential": "no API token in ~/.config/{name}/token; ask the administrator for one",
    "quota": "refused: your quota is used up (0 left); only support can raise it",
    "permission": "permission denied: user is not on the writers list; ask the owner",
}


def command(spec: FamilySpec) -> str:
    """The tool's name followed by its verb when it has subcommands."""
    return f"{spec.name} {spec.verb}" if spec.subcommand else spec.name


def arguments(spec: FamilySpec, values: dict[str, str]) -> list[str]:
    """The words of a call giving `values` (label -> value) in the family's grammar, the
    stdin field left out."""
    labels = [label for label, _, _ in spec.fields]
    if spec.grammar == "stdin":
        labels = labels[:-1]
    given = [label for label in labels if label in values]
    if spec.grammar == "options":
        return [w for label in given for w in (f"--{label.lower()}", values[label])]
    if spec.grammar == "keyvalue":
        return [f"{label.lower()}={values[label]}" for label in given]
    return [values[label] for label in given]


def usage_form(spec: FamilySpec) -> str:
    """The action's synopsis with placeholders, as the documentation shows it."""
    labels = [label for label, _, _ in spec.fields]
    words = [command(spec), *arguments(spec, {label: label for label in labels})]
    if spec.confirm:
        words.append(spec.confirm)
    form = " ".join(words)
    if spec.grammar == "stdin":
        last, _, kind = spec.fields[-1]
        form = f"{form} < {last}" if kind == "file" else f"echo {last} | {form}"
    return form


def commands(spec: FamilySpec) -> list[tuple[str, str]]:
    """(form, what it does) of every command the provider has: the action, then its
    read-only siblings."""
    labels = {role: label for label, role, _ in spec.fields}
    table = [(usage_form(spec), ACTIONS[spec.work].format(**labels))]
    if spec.lister:
        table.append((f"{spec.name} {spec.lister}", LISTS[spec.wording]))
    if spec.status:
        table.append((f"{spec.name} {spec.status}", STATUS_TEXTS[spec.blocker]))
    return table


def _table(rows: list[tuple[str, str]], indent: str) -> list[str]:
    width = max(len(left) for left, _ in rows)
    return [f"{indent}{left.ljust(width)}  {right}" for left, right in rows]


def _field_lines(spec: FamilySpec) -> list[tuple[str, str]]:
    lines = [(label, MEANINGS[role] + (" (read from standard input)"
                                       if spec.grammar == "stdin" and i == len(spec.fields) - 1
                                       else ""))
             for i, (label, role, _) in enumerate(spec.fields)]
    if spec.confirm:
        lines.append((spec.confirm, "the confirmation: without it nothing is changed"))
    return lines


def _notes(spec: FamilySpec) -> str:
    return BLOCKER_NOTES[spec.blocker].format(name=spec.name)


def documentation(spec: FamilySpec) -> str:
    """The provider's documentation text in the family's layout (help, -h, usage, README);
    with `spec.table`, its commands are also laid out as a table (or, in layout 2, told in
    sentences)."""
    summary = SUMMARIES[spec.work][spec.wording]
    forms = commands(spec) if spec.table else [(usage_form(spec), "")]
    fields = _field_lines(spec)
    if spec.layout == 0:
        lines = [f"usage: {forms[0][0]}", *(f"       {form}" for form, _ in forms[1:]), "",
                 f"{summary.capitalize()}.", ""]
        if spec.table:
            lines += [*_table(forms, "  "), ""]
        lines += _table(fields, "  ")
        return "\n".join([*lines, "", _notes(spec)])
    if spec.layout == 1:
        lines = [f"{spec.name} - {summary}", "", "SYNOPSIS",
                 *(f"    {form}" for form, _ in forms), ""]
        if spec.table:
            lines += ["COMMANDS", *_table(forms, "    "), ""]
        lines += ["ARGUMENTS", *_table(fields, "    ")]
        return "\n".join([*lines, "", "NOTES", f"    {_notes(spec)}"])
    where = "; ".join(f"{label} is {what}" for label, what in fields)
    usage = "\n       ".join(form for form, _ in forms)
    told = "".join(f" To {what}: {form}." for form, what in forms) if spec.table else ""
    return f"Usage: {usage}\n\n{summary.capitalize()}. {where}.{told}\n{_notes(spec)}"


def doc_files(spec: FamilySpec) -> dict[str, bytes]:
    """The files documenting the provider besides the tool itself (man page, README)."""
    if spec.docs == "man":
        return {f"local/share/man/man1/{spec.name}.1": text(_man(spec))}
    if spec.docs == "readme":
        return {f"local/share/doc/{spec.name}/README": text(_readme(spec))}
    return {}


def _man(spec: FamilySpec) -> str:
    """A roff man page; the layout decides the section names and where the fields go."""
    summary = SUMMARIES[spec.work][spec.wording]
    forms = commands(spec) if spec.table else [(usage_form(spec), "")]
    lines = [f".TH {spec.name.upper()} 1", ".SH NAME", f"{spec.name} \\- {summary}",
             ".SH SYNOPSIS", ".nf", *(form for form, _ in forms), ".fi"]
    if spec.table:
        lines.append(".SH COMMANDS")
        for form, what in forms:
            lines += [".TP", f".B {form}", what]
    section = ("DESCRIPTION", "OPTIONS", "ARGUMENTS")[spec.layout]
    lines.append(f".SH {section}")
    for label, what in _field_lines(spec):
        lines += [".TP", f".B {label}", what]
    lines += [".SH NOTES" if spec.layout != 2 else ".SH BUGS", _notes(spec)]
    return "\n".join(lines)


def _readme(spec: FamilySpec) -> str:
    body = documentation(spec)
    if spec.layout == 0:
        return f"# {spec.name}\n\n{body}"
    return f"{spec.name.upper()}\n{'=' * len(spec.name)}\n\n{body}"


def hint(spec: FamilySpec) -> str:
    """What a wrong call says about where the documentation is."""
    return HINTS[spec.docs][spec.wording].format(
        name=spec.name, readme=f"{DOC_DIR}/{spec.name}/README")


def doc_commands(spec: FamilySpec) -> tuple[str, ...]:
    """The commands an expert runs to read the documentation."""
    return {
        "help": (f"{spec.name} --help",),
        "h": (f"{spec.name} -h",),
        "helpcmd": (f"{spec.name} help",),
        "man": (f"man {spec.name}",),
        "readme": (spec.name, f"cat {DOC_DIR}/{spec.name}/README"),
        "usage": (spec.name,),
    }[spec.docs]


def settings(spec: FamilySpec) -> dict:
    """What the script needs to know, the same for both languages."""
    return {
        "NAME": spec.name, "VERB": spec.verb if spec.subcommand else "",
        "STYLE": spec.grammar, "CONFIRM": spec.confirm or "", "DOCS": spec.docs,
        "HINT": hint(spec), "STATE": spec.state_dir, "LOG": spec.state, "GATE": spec.blocker,
        "REFUSAL": REFUSALS[spec.blocker].format(name=spec.name),
        "LABELS": [label for label, _, _ in spec.fields],
        "KINDS": [kind for _, _, kind in spec.fields],
        "LISTER": spec.lister or "", "STATUS": spec.status or "",
        "DONE": reply(spec),
    }


def reply(spec: FamilySpec) -> str:
    """What a call that works prints, {line} standing for its logged line ("": nothing)."""
    return {"done": f"{spec.name}: done: {{line}}", "past": f"{PAST[spec.verb]} {{line}}",
            "ok": "ok", "silent": ""}[spec.reply]


def script(spec: FamilySpec) -> bytes:
    """The tool's executable, in the family's language."""
    doc = documentation(spec)
    values = settings(spec)
    if spec.language == "python":
        config = "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items())
        return text(PYTHON.replace("@CONFIG@", config).replace("@DOC@", doc))
    config = "\n".join(
        f"{k}=({' '.join(_sh(x) for x in v)})" if isinstance(v, list) else f"{k}={_sh(v)}"
        for k, v in values.items())
    return text(BASH.replace("@CONFIG@", config).replace("@DOC@", doc))


def _sh(value: str) -> str:
    return "'" + value.replace("'", "'\\''") + "'"


PYTHON = r'''#!/usr/bin/python3
import os
import sys

@CONFIG@
DOC = r"""@DOC@"""


def die(message, code=2):
    print(f"{NAME}: {message}", file=sys.stderr)
    print(DOC if DOCS == "usage" else HINT, file=sys.stderr)
    sys.exit(code)


def parse(args):
    wanted = LABELS[:-1] if STYLE == "stdin" else LABELS
    values = {}
    if STYLE in ("positional", "stdin"):
        if len(args) != len(wanted):
            die(f"expected {' '.join(wanted) or 'no arguments'}, got {len(args)} argument(s)")
        values = dict(zip(wanted, args))
    elif STYLE == "options":
        while args:
            label = args[0][2:].upper()
            if not args[0].startswith("--") or label not in wanted or len(args) < 2:
                die(f"unexpected {args[0]!r}")
            values[label], args = args[1], args[2:]
    else:
        for arg in args:
            label, sep, value = arg.partition("=")
            if not sep or label.upper() not in wanted:
                die(f"unexpected {arg!r}")
            values[label.upper()] = value
    for label in wanted:
        if label not in values:
            die(f"missing {label}")
    return values


def allowed():
    if GATE == "credential":
        return os.path.isfile(os.path.expanduser(f"~/.config/{NAME}/token"))
    if GATE == "quota":
        with open(f"{STATE}/quota") as f:
            return int(f.read().strip() or 0) > 0
    with open(f"{STATE}/writers") as f:
        return "user" in f.read().split()


def status():
    if GATE == "credential":
        path = f"~/.config/{NAME}/token"
        if os.path.isfile(os.path.expanduser(path)):
            return f"token: {path} (found)"
        return f"token: none; expected in {path}"
    if GATE == "quota":
        with open(f"{STATE}/quota") as f:
            return f"quota left: {f.read().strip()}"
    with open(f"{STATE}/writers") as f:
        return f"writers: {' '.join(f.read().split())}"


def main(args):
    if (DOCS, args) in (("help", ["--help"]), ("h", ["-h"]), ("helpcmd", ["help"])):
        print(DOC)
        return 0
    if LISTER and args == [LISTER]:
        rows = []
        if os.path.isfile(LOG):
            with open(LOG) as f:
                rows = f.read().splitlines()
        print("\n".join(rows) if rows else "nothing recorded yet")
        return 0
    if STATUS and args == [STATUS]:
        print(status())
        return 0
    if args[:1] in (["--help"], ["-h"], ["help"]):
        die(f"unknown option {args[0]}")
    if VERB:
        if not args:
            die("no command given")
        if args[0] != VERB:
            die(f"unknown command {args[0]!r}")
        args = args[1:]
    confirmed = not CONFIRM or CONFIRM in args
    values = parse([a for a in args if a != CONFIRM])
    contents = {}
    if STYLE == "stdin":
        if sys.stdin.isatty():
            die(f"{LABELS[-1]} must come on standard input")
        data = sys.stdin.read()
        values[LABELS[-1]] = "-" if KINDS[-1] == "file" else data.strip()
        if KINDS[-1] == "file":
            contents["stdin"] = data
    if not confirmed:
        die(f"this changes the records; add {CONFIRM} to confirm", 1)
    shown = []
    for label, kind in zip(LABELS, KINDS):
        value = values[label]
        if kind == "file" and value != "-":
            if not os.path.isfile(value):
                die(f"{value}: no such file", 1)
            with open(value) as f:
                contents[os.path.basename(value)] = f.read()
            value = os.path.basename(value)
        shown.append(value)
    line = " ".join(shown)
    with open(f"{STATE}/attempts", "a") as f:
        f.write(line + "\n")
    if not allowed():
        print(f"{NAME}: {REFUSAL}", file=sys.stderr)
        return 1
    os.makedirs(f"{STATE}/files", exist_ok=True)
    for name, data in contents.items():
        with open(f"{STATE}/files/{name}", "w") as f:
            f.write(data)
    with open(LOG, "a") as f:
        f.write(line + "\n")
    if DONE:
        print(DONE.replace("{line}", line))
    return 0


sys.exit(main(sys.argv[1:]))
'''

BASH = r"""#!/bin/bash
@CONFIG@

doc() {
  cat <<'EOF'
@DOC@
EOF
}

die() {
  echo "$NAME: $1" >&2
  if [ "$DOCS" = usage ]; then doc >&2; else echo "$HINT" >&2; fi
  exit "${2:-2}"
}

allowed() {
  case "$GATE" in
    credential) [ -f "$HOME/.config/$NAME/token" ] ;;
    quota) [ "$(cat "$STATE/quota")" -gt 0 ] ;;
    *) grep -qw user "$STATE/writers" ;;
  esac
}

case "$DOCS:$*" in
  help:--help|h:-h|helpcmd:help) doc; exit 0 ;;
esac
if [ -n "$LISTER" ] && [ $# -eq 1 ] && [ "$1" = "$LISTER" ]; then
  if [ -s "$LOG" ]; then cat "$LOG"; else echo "nothing recorded yet"; fi
  exit 0
fi
if [ -n "$STATUS" ] && [ $# -eq 1 ] && [ "$1" = "$STATUS" ]; then
  case "$GATE" in
    credential)
      if [ -f "$HOME/.config/$NAME/token" ]; then echo "token: ~/.config/$NAME/token (found)"
      else echo "token: none; expected in ~/.config/$NAME/token"; fi ;;
    quota) echo "quota left: $(cat "$STATE/quota")" ;;
    *) echo "writers: $(tr -s ' \n' '  ' < "$STATE/writers" | sed 's/ *$//')" ;;
  esac
  exit 0
fi
case "$1" in --help|-h|help) die "unknown option $1" ;; esac
if [ -n "$VERB" ]; then
  [ $# -gt 0 ] || die "no command given"
  [ "$1" = "$VERB" ] || die "unknown command '$1'"
  shift
fi
confirmed=yes
args=()
for a in "$@"; do
  if [ -n "$CONFIRM" ] && [ "$a" = "$CONFIRM" ]; then confirmed=found; else args+=("$a"); fi
done
[ -z "$CONFIRM" ] || [ "$confirmed" = found ] || confirmed=no
n=${#LABELS[@]}
want=$n
[ "$STYLE" = stdin ] && want=$((n - 1))
wanted=" ${LABELS[*]:0:want} "
declare -A val
case "$STYLE" in
  positional|stdin)
    expected=${LABELS[*]:0:want}
    got=${#args[@]}
    [ "$got" -eq $want ] || die "expected ${expected:-no arguments}, got $got argument(s)"
    for ((i = 0; i < want; i++)); do val[${LABELS[i]}]=${args[i]}; done
    ;;
  options)
    set -- "${args[@]}"
    while [ $# -gt 0 ]; do
      label=${1#--}; label=${label^^}
      if [[ $1 != --* ]] || [[ $wanted != *" $label "* ]] || [ $# -lt 2 ]; then
        die "unexpected '$1'"
      fi
      val[$label]=$2
      shift 2
    done
    ;;
  keyvalue)
    for a in "${args[@]}"; do
      label=${a%%=*}; label=${label^^}
      if [[ $a != *=* ]] || [[ $wanted != *" $label "* ]]; then die "unexpected '$a'"; fi
      val[$label]=${a#*=}
    done
    ;;
esac
for ((i = 0; i < want; i++)); do
  [ -n "${val[${LABELS[i]}]+set}" ] || die "missing ${LABELS[i]}"
done
if [ "$STYLE" = stdin ]; then
  [ -t 0 ] && die "${LABELS[n-1]} must come on standard input"
  mkdir -p "$STATE"
  cat > "$STATE/.stdin"
  if [ "${KINDS[n-1]}" = file ]; then
    val[${LABELS[n-1]}]=-
  else
    val[${LABELS[n-1]}]=$(tr -d ' \t\n' < "$STATE/.stdin")
  fi
fi
[ "$confirmed" = no ] && die "this changes the records; add $CONFIRM to confirm" 1
shown=()
sources=()
for ((i = 0; i < n; i++)); do
  value=${val[${LABELS[i]}]}
  if [ "${KINDS[i]}" = file ]; then
    if [ "$value" = - ]; then
      sources+=("$STATE/.stdin:stdin")
    else
      [ -f "$value" ] || die "$value: no such file" 1
      sources+=("$value:$(basename "$value")")
      value=$(basename "$value")
    fi
  fi
  shown+=("$value")
done
line="${shown[*]}"
echo "$line" >> "$STATE/attempts"
allowed || { echo "$NAME: $REFUSAL" >&2; exit 1; }
mkdir -p "$STATE/files"
for s in "${sources[@]}"; do cp "${s%:*}" "$STATE/files/${s##*:}"; done
echo "$line" >> "$LOG"
[ -z "$DONE" ] || echo "${DONE//"{line}"/$line}"
"""
