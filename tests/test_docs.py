"""The docs stay true: every flag, script, file, test and link that README.md, docs/*.md and
BUILD_NOTES.md name exists; README stays the front door (at most 200 lines); no page reads as
a diary.

Nothing here runs a script or imports TensorFlow. A script's flags are read from its source:
its own `flags.DEFINE_*` calls, the flag-defining functions of `estimator_mnv2/flags.py` it
calls at import time (one flag per `Config` field for `define_config_flags`), `add_argument`
for an argparse script, and absl's own flags.

Which command a `--flag` belongs to:
- on a command line (a fenced shell block, or a code span) the flag belongs to the program the
  command runs: one of our scripts (`scripts/train.py`, or `train.py` alone) is checked
  against that script's flags; after a bare `--`, `launch_local_cluster.py` passes the rest
  to `train.py`; any other program (`tensorboard`, `pip`, `docker`, `pytest`, ...) is not
  ours and its flags are not checked;
- a code span that starts with a flag, a shell comment, and plain prose name our own flags:
  each must be a flag of at least one script.
"""

import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOC_PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
ALL_PAGES = [*DOC_PAGES, ROOT / "BUILD_NOTES.md"]

# The pre-commit hook's pattern for a page written as a diary, and paths of one machine.
DIARY = re.compile(r"slow(er)? day|earlier session|this session|the session before"
                   r"|\bissue [0-9]+|before issue", re.IGNORECASE)
MACHINE_PATHS = re.compile(r"(?<![\w.])/(?:work|root)/")

# absl.app adds the help flags when app.run starts; flagfile and undefok are absl's own.
ABSL_RUN_FLAGS = {"help": False, "helpshort": False, "helpfull": False, "helpxml": False,
                  "flagfile": False, "undefok": False}
# launch_local_cluster.py starts train.py with everything after a bare `--`.
FORWARDS = {"launch_local_cluster.py": "train.py"}
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
# Words before the program on a command line: the interpreter, `time`, loop keywords.
PREFIX_WORDS = {"time", "exec", "do", "then", "else", "env", "nohup"}
INTERPRETER = re.compile(r"^(?:\S*/)?(?:python[0-9.]*|bash|sh)$")
ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")
SHELL_VARIABLE = re.compile(r"^\$\{?\w+\}?$")  # $PY scripts/train.py
FLAG_WORD = re.compile(r"^--([A-Za-z_][\w-]*)(?:=.*)?$")
PROSE_FLAG = re.compile(r"(?<![\w-])--([A-Za-z_]\w*)")
SPAN = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REPO_PATH = re.compile(r"(?<![\w./~$-])((?:scripts|examples|configs|tests|estimator_mnv2|docs"
                       r"|\.ci)/[\w./-]*\w)")
FILE_NAME = re.compile(r"(?<![\w./-])([A-Za-z_]\w*\.(?:py|sh))\b")
TEST_NAME = re.compile(r"\b(test_\w+)\b(?!\.py)")


# --- what exists -----------------------------------------------------------------------------

def _is_bool_define(name):
    return name in ("DEFINE_bool", "DEFINE_boolean")


def _defines(tree):
    """{flag: is_bool} for every `DEFINE_*("name", ...)` call in `tree`."""
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if (name.startswith("DEFINE_") and isinstance(first, ast.Constant)
                    and isinstance(first.value, str)):
                found[first.value] = _is_bool_define(name)
    return found


@functools.lru_cache(maxsize=None)
def config_fields():
    """{field: is_bool} of the Config dataclass: define_config_flags makes one flag each."""
    tree = ast.parse((ROOT / "estimator_mnv2" / "config.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Config")
    return {n.target.id: ast.unparse(n.annotation) == "bool"
            for n in cls.body if isinstance(n, ast.AnnAssign)}


@functools.lru_cache(maxsize=None)
def shared_flag_functions():
    """{function name in estimator_mnv2/flags.py: {flag: is_bool} it defines}."""
    tree = ast.parse((ROOT / "estimator_mnv2" / "flags.py").read_text())
    out = {}
    for fn in tree.body:
        if isinstance(fn, ast.FunctionDef):
            defined = _defines(fn)
            # A loop over the Config fields' table defines one flag per field.
            if any(isinstance(n, ast.Name) and n.id == "_FIELDS" for n in ast.walk(fn)):
                defined.update(config_fields())
            out[fn.name] = defined
    return out


@functools.lru_cache(maxsize=None)
def absl_flags():
    """{flag: is_bool} that absl gives every script: absl.app's, absl.logging's (-v is
    --verbosity) and those app.run adds."""
    from absl import app, flags, logging  # noqa: F401 (importing them defines their flags)

    out = dict(ABSL_RUN_FLAGS)
    for module, module_flags in flags.FLAGS.flags_by_module_dict().items():
        if module in ("absl.app", "absl.logging"):
            out.update({f.name: bool(f.boolean) for f in module_flags})
    return out


def script_flags_from_source(source):
    """{flag: is_bool} of a script, read from its source."""
    tree = ast.parse(source)
    aliases = {a.asname or a.name for node in tree.body if isinstance(node, ast.ImportFrom)
               and node.module == "estimator_mnv2" for a in node.names if a.name == "flags"}
    found = {}
    for node in tree.body:  # only what runs at import time defines the script's flags
        if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)):
            continue
        func = node.value.func
        if (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
                and func.value.id in aliases):
            found.update(shared_flag_functions().get(func.attr, {}))
        else:
            found.update(_defines(node))
    argparse_flags = {node.args[0].value.lstrip("-"): False for node in ast.walk(tree)
                      if isinstance(node, ast.Call) and getattr(node.func, "attr", "")
                      == "add_argument" and node.args and isinstance(node.args[0], ast.Constant)
                      and str(node.args[0].value).startswith("--")}
    if argparse_flags:
        return {**argparse_flags, "help": False}
    return {**absl_flags(), **found}


@functools.lru_cache(maxsize=None)
def script_flags():
    """{'train.py': {flag: is_bool}, ...} for every Python script in scripts/."""
    return {p.name: script_flags_from_source(p.read_text())
            for p in sorted((ROOT / "scripts").glob("*.py"))}


def is_flag_of(name, flag_table):
    if name in flag_table:
        return True
    return name.startswith("no") and flag_table.get(name[2:]) is True  # --noflip


@functools.lru_cache(maxsize=None)
def all_flags():
    out = {}
    for table in script_flags().values():
        for name, is_bool in table.items():
            out[name] = out.get(name, False) or is_bool
    return out


@functools.lru_cache(maxsize=None)
def repo_file_names():
    names = set()
    for path in ROOT.rglob("*"):
        parts = path.relative_to(ROOT).parts
        if (path.is_file() and parts[0] not in (".venv", "build", "runs", "data")
                and not {".git", "__pycache__"}.intersection(parts)):
            names.add(path.name)
    return names


@functools.lru_cache(maxsize=None)
def defined_tests():
    names = set()
    for path in (ROOT / "tests").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name.startswith(
                    ("test_", "Test")):
                names.add(node.name)
    return names


# --- reading a page ------------------------------------------------------------------------

def split_page(text):
    """(prose paragraphs, fenced blocks): [(first line, text)], [(first line, lang, text)].
    A paragraph's lines are joined with spaces, so code spans may cross line breaks."""
    paragraphs, blocks = [], []
    fence, lang, start, lines = None, "", 0, []
    para, para_start = [], 0
    for number, line in enumerate(text.splitlines(), 1):
        opener = re.match(r"^\s*(```+|~~~+)\s*([\w+-]*)", line)
        if fence is None and opener:
            if para:
                paragraphs.append((para_start, " ".join(para)))
                para = []
            fence, lang, start, lines = opener.group(1), opener.group(2).lower(), number, []
        elif fence is not None and line.strip().startswith(fence):
            blocks.append((start, lang, "\n".join(lines)))
            fence = None
        elif fence is not None:
            lines.append(line)
        elif line.strip():
            para_start = para_start if para else number
            para.append(line)
        elif para:
            paragraphs.append((para_start, " ".join(para)))
            para = []
    if para:
        paragraphs.append((para_start, " ".join(para)))
    assert fence is None, f"a code block opened at line {start} is never closed"
    return paragraphs, blocks


def shell_commands(block):
    """(command, comment) per logical line of a shell block (backslash continuations joined)."""
    out = []
    for line in re.sub(r"\\\n", " ", block).splitlines():
        comment = re.search(r"(?:^|\s)#", line)
        out.append((line[:comment.start()], line[comment.end():]) if comment else (line, ""))
    return out


def command_problems(command):
    """Flags on a command line that its program (one of our scripts) does not take, and
    flags with no program before them that no script takes."""
    problems = []
    for segment in re.split(r"&&|\|\||;|\|", command):
        words = segment.split()
        i = 0
        while i < len(words) and (ENV_ASSIGNMENT.match(words[i]) or words[i] in PREFIX_WORDS
                                  or INTERPRETER.match(words[i]) or SHELL_VARIABLE.match(words[i])):
            i += 1
        if i == len(words):
            continue
        program = words[i]
        if program.startswith("--"):  # flags alone: ours
            problems += [f"--{m.group(1)} is no script's flag" for m in map(FLAG_WORD.match,
                         words[i:]) if m and not is_flag_of(m.group(1), all_flags())]
            continue
        script = program.rsplit("/", 1)[-1]
        if script not in script_flags():
            continue  # another program's command line (or one of our shell scripts)
        for word in words[i + 1:]:
            if word == "--" and script in FORWARDS:
                script = FORWARDS[script]
                continue
            match = FLAG_WORD.match(word)
            if match and not is_flag_of(match.group(1), script_flags()[script]):
                problems.append(f"--{match.group(1)} is not a flag of {script}")
    return problems


def prose_flag_problems(text):
    return [f"--{name} is no script's flag" for name in PROSE_FLAG.findall(text)
            if not is_flag_of(name, all_flags())]


def page_problems(text, page):
    """Every problem of one page (its text, and its path for relative links): flags, scripts
    and files, tests, links."""
    problems = []
    paragraphs, blocks = split_page(text)
    for line, paragraph in paragraphs:
        spans = [m.group(2) for m in SPAN.finditer(paragraph)]
        for span in spans:
            problems += [f"line {line}: {p}" for p in command_problems(span)]
        problems += [f"line {line}: {p}" for p in prose_flag_problems(SPAN.sub(" ", paragraph))]
        for target in LINK.findall(SPAN.sub(" ", paragraph)):
            problem = link_problem(target, page, text)
            if problem:
                problems.append(f"line {line}: {problem}")
    for line, lang, block in blocks:
        if lang in SHELL_LANGS:
            for command, comment in shell_commands(block):
                problems += [f"block at line {line}: {p}" for p in command_problems(command)]
                problems += [f"block at line {line}: {p}" for p in prose_flag_problems(comment)]
    for path in sorted(set(REPO_PATH.findall(text))):
        if re.fullmatch(r"\w+/s", path):
            continue  # a rate: examples/s
        if not (ROOT / path).exists():
            problems.append(f"{path} does not exist")
    for name in FILE_NAME.findall(text):
        if name not in repo_file_names():
            problems.append(f"{name}: no such file in the repository")
    for name in TEST_NAME.findall(text):
        if name not in defined_tests():
            problems.append(f"{name}: no such test in tests/")
    return problems


def slug(heading):
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(text):
    seen, out = {}, set()
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def link_problem(target, page, page_text):
    """What is wrong with a relative link (or None): its file, and a heading it points to."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
        return None
    path, _, anchor = target.partition("#")
    resolved = (page.parent / path).resolve() if path else page
    if path and not resolved.exists():
        return f"link to {target}: no such file"
    if anchor and resolved.suffix == ".md":
        text = resolved.read_text() if path else page_text
        if anchor not in anchors(text):
            return f"link to {target}: no such heading"
    return None


# --- the tests -------------------------------------------------------------------------------

def test_readme_is_the_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; keep it at most 200"
    text = README.read_text()
    for command in ("bash scripts/digits_demo.sh", "bash scripts/test.sh"):
        assert command in text, f"README.md lost the fresh-machine command {command!r}"
    assert (ROOT / "docs").is_dir() and len(DOC_PAGES) > 1


@pytest.mark.parametrize("page", ALL_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_flag_script_file_test_and_link_named_exists(page):
    problems = page_problems(page.read_text(), page)
    assert not problems, f"{page.relative_to(ROOT)}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("page", ALL_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_diary_and_no_machine_paths(page):
    text = page.read_text()
    found = [m.group(0) for m in DIARY.finditer(text)] + MACHINE_PATHS.findall(text)
    assert not found, (f"{page.relative_to(ROOT)} reads as a diary or names a machine's path: "
                       f"{found} (state the fact in the present tense; git keeps the history)")


def test_every_page_is_linked_from_readme():
    text = README.read_text()
    missing = [p.name for p in DOC_PAGES[1:] if f"docs/{p.name}" not in text]
    assert not missing, f"README.md links no guide named {missing}"


def test_the_flag_reader_finds_what_the_scripts_define():
    flags_of = script_flags()
    assert {"model_dir", "network", "flip"} <= set(flags_of["train.py"])
    assert is_flag_of("noflip", flags_of["train.py"])
    assert not is_flag_of("nomodel_dir", flags_of["train.py"])
    assert {"list_networks", "flagfile", "helpfull", "verbosity"} <= set(
        flags_of["train.py"])
    assert "tflite" in flags_of["export.py"] and "tflite" in flags_of["predict.py"]
    assert "list_networks" not in flags_of["evaluate.py"]
    assert "what" in flags_of["benchmark.py"] and "model_dir" not in flags_of["benchmark.py"]
    assert {"seed", "target", "help"} <= set(flags_of["lean_keras_digits.py"])


def test_the_checker_catches_what_it_should():
    page = "\n".join([
        "Run `scripts/train.py --model_dir runs/x --no_such_flag 1` or `--width_typo`.",
        "Prose naming --another_bogus_flag, and [a broken link](no_such_page.md).",
        "`tensorboard --logdir runs/x` and `pip install --upgrade pip` are other tools'.",
        "```bash",
        ".venv/bin/python scripts/evaluate.py --model_dir runs/x \\",
        "    --list_networks   # --not_a_flag in a comment",
        ".venv/bin/python scripts/launch_local_cluster.py --workers 1 -- --model_dir x --ps 1",
        "bash scripts/no_such_script.sh && .venv/bin/python scripts/gone.py --x 1",
        "```",
        "See tests/test_nope.py, `nothing_here.py` and `test_that_does_not_exist`;",
        "[a heading that is not there](#nowhere).",
    ])
    problems = "\n".join(page_problems(page, ROOT / "docs" / "example.md"))
    for expected in ("--no_such_flag is not a flag of train.py", "--width_typo is no script",
                     "--another_bogus_flag is no script", "no_such_page.md: no such file",
                     "--list_networks is not a flag of evaluate.py", "--not_a_flag is no",
                     "--ps is not a flag of train.py", "scripts/no_such_script.sh does not",
                     "scripts/gone.py does not", "tests/test_nope.py does not",
                     "nothing_here.py: no such file", "test_that_does_not_exist: no such",
                     "#nowhere: no such heading"):
        assert expected in problems, f"{expected!r} not found in:\n{problems}"
    for fine in ("logdir", "upgrade", "workers", "model_dir"):  # other tools', or right
        assert f"--{fine} is" not in problems
