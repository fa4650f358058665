"""LaTeX source -> plain text with a document outline (title, abstract, headings as character spans).

The pipeline for one paper, all in memory:

1. ``strip_comments`` on every file, then ``inline_inputs`` resolves ``\\input``/``\\include`` from the
   paper's own files (relative paths, with or without ``.tex``, cycles and depth guarded);
2. ``find_main_file`` picks the file with ``\\documentclass`` and ``\\begin{document}``;
3. simple user macros (``\\newcommand``, ``\\def`` with up to 9 arguments) are expanded in the source, so
   that ``\\be ... \\ee`` style shorthands for equations become real environments before parsing;
4. pylatexenc's ``LatexWalker`` parses the body and a ``LatexNodes2Text`` subclass renders it: comments,
   figures, tables, listings, the bibliography and the preamble disappear; math becomes ``[MATH]``,
   citations ``[CITE]``, references ``[REF]``, inline code (``\\verb``) ``[CODE]``; accents and specials become Unicode. Headings and the
   abstract are wrapped in private-use marker characters that ``_extract_spans`` turns into spans after
   the whitespace clean-up, so every span is exact in the final text.

Spans are ``{"kind", "level", "start", "end"}`` with ``text[start:end]`` the heading (or abstract) text.
Levels follow LaTeX's own sectioning depth (part -1, chapter 0, section 1, subsection 2,
subsubsection 3, paragraph 4, subparagraph 5); the title and the abstract have level 0.
"""
from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field

from pylatexenc.latex2text import (
    EnvironmentTextSpec,
    LatexNodes2Text,
    MacroTextSpec,
    get_default_latex_context_db as l2t_default_db,
)
from pylatexenc.latexwalker import LatexWalker, get_default_latex_context_db as walker_default_db
from pylatexenc.macrospec import EnvironmentSpec, MacroSpec

MATH = "[MATH]"
CITE = "[CITE]"
REF = "[REF]"
CODE = "[CODE]"

HEADING_LEVELS = {
    "part": -1, "chapter": 0, "section": 1, "subsection": 2, "subsubsection": 3,
    "paragraph": 4, "subparagraph": 5,
}
SPAN_KINDS = ("title", "abstract") + tuple(HEADING_LEVELS)

# Private-use characters mark spans while rendering; they are removed from the input first.
_OPEN, _CLOSE = "\ue000", "\ue001"
_KIND_CODE = {k: chr(0xE010 + i) for i, k in enumerate(SPAN_KINDS)}
_CODE_KIND = {v: k for k, v in _KIND_CODE.items()}
_PRIVATE_RE = re.compile("[\ue000-\ue0ff]")


class Rejected(ValueError):
    """One paper cannot be used; ``reason`` is a short machine-readable code (the corpus's rejects
    count by it), ``detail`` says what was found. Reading (arxiv.py) and converting (here) raise it."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Document:
    title: str
    text: str
    structure: list[dict] = field(default_factory=list)
    main_file: str = ""
    missing_inputs: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# source-level steps: comments, \input, main file, user macros

def strip_comments(src: str) -> str:
    """Remove ``%`` comments (an unescaped ``%`` to the end of the line, plus the line break and the
    next line's leading blanks, as TeX does), and the body of ``comment`` environments."""
    out = []
    for line in src.split("\n"):
        i = line.find("%")
        while i != -1:
            # a % preceded by an odd number of backslashes is a literal percent sign
            j = i
            while j > 0 and line[j - 1] == "\\":
                j -= 1
            if (i - j) % 2 == 0:
                line = line[:i]
                out.append(line)
                out.append("\x00")  # comment ate the newline: join with the next line
                break
            i = line.find("%", i + 1)
        else:
            out.append(line)
            out.append("\n")
    text = "".join(out[:-1]) if out else ""
    text = re.sub(r"\x00[ \t]*", "", text)
    return re.sub(r"\\begin\{comment\}.*?\\end\{comment\}", "", text, flags=re.S)


_INPUT_RE = re.compile(r"\\(input|include|subfile)(?![a-zA-Z@])\s*(?:\{([^{}]*)\}|([^\s{}\\%]+))")
_DOCCLASS_RE = re.compile(r"\\document(?:class|style)(?![a-zA-Z@])")
_BEGIN_DOC_RE = re.compile(r"\\begin\s*\{document\}")
_END_DOC_RE = re.compile(r"\\end\s*\{document\}")
# environments whose body TeX reads verbatim: a `\\end{document}` (or `\\begin{document}`) written in them
# is an example, not the end of the paper
_VERBATIM_ENVS = ("verbatim", "verbatim*", "Verbatim", "Verbatim*", "BVerbatim", "LVerbatim", "lstlisting",
                  "minted", "alltt", "filecontents", "filecontents*", "comment", "spverbatim", "lstcode")
_VERBATIM_RE = re.compile(r"\\begin\s*\{(" + "|".join(re.escape(e) for e in _VERBATIM_ENVS)
                          + r")\}.*?\\end\s*\{\1\}|\\verb\*?([^a-zA-Z\s*])[^\n]*?\2", re.S)


def _search_outside_verbatim(pattern: re.Pattern, src: str) -> re.Match | None:
    """The first match of ``pattern`` in ``src`` that is not inside a verbatim environment or ``\\verb``."""
    spans = [m.span() for m in _VERBATIM_RE.finditer(src)]
    for m in pattern.finditer(src):
        if not any(a <= m.start() < b for a, b in spans):
            return m
    return None


def _resolve(name: str, base_dir: str, files: dict[str, str]) -> str | None:
    name = name.strip().strip('"').strip()
    if not name:
        return None
    for d in (base_dir, ""):
        p = posixpath.normpath(posixpath.join(d, name))
        for cand in (p, p + ".tex"):
            if cand in files:
                return cand
    return None


def inline_inputs(files: dict[str, str], main: str, max_depth: int = 20,
                  max_chars: int = 20_000_000, missing: list[str] | None = None) -> str:
    """The main file's text with every ``\\input``/``\\include`` replaced by the included file's text
    (comments stripped). Missing files become empty (their names are appended to ``missing``); a file
    that includes itself, directly or not, is included once per branch only."""
    base_dir = posixpath.dirname(main)
    total = [0]

    def expand(path: str, stack: tuple[str, ...]) -> str:
        text = strip_comments(files[path])
        m = re.search(r"\\endinput(?![a-zA-Z@])", text)
        if m:
            text = text[:m.start()]

        def repl(m: re.Match) -> str:
            target = _resolve(m.group(2) if m.group(2) is not None else m.group(3), base_dir, files)
            if target is None:
                if missing is not None:
                    missing.append((m.group(2) or m.group(3) or "").strip())
                return " "
            if target in stack or len(stack) >= max_depth:
                return " "
            inner = expand(target, stack + (target,))
            total[0] += len(inner)
            if total[0] > max_chars:
                raise Rejected("too-large", f"inlined LaTeX exceeds {max_chars} characters")
            sep = "\n\\clearpage\n" if m.group(1) == "include" else "\n"
            return sep + inner + sep
        return _INPUT_RE.sub(repl, text)

    return expand(main, (main,))


def find_main_file(files: dict[str, str]) -> str:
    """The file with ``\\documentclass`` (or 2.09's ``\\documentstyle``) and ``\\begin{document}``;
    among several, the one no other candidate includes, then the largest, then the first by name."""
    cands = []
    for name, text in files.items():
        if not name.lower().endswith((".tex", ".ltx", ".latex")) and "." in posixpath.basename(name):
            continue
        t = strip_comments(text)
        if _DOCCLASS_RE.search(t) and _BEGIN_DOC_RE.search(t):
            cands.append((name, t))
    if not cands:
        raise Rejected("no-main-file", "no file has \\documentclass and \\begin{document}")
    if len(cands) > 1:
        included = set()
        for name, t in cands:
            for m in _INPUT_RE.finditer(t):
                r = _resolve(m.group(2) or m.group(3) or "", posixpath.dirname(name), files)
                if r and r != name:
                    included.add(r)
        top = [c for c in cands if c[0] not in included] or cands
        top.sort(key=lambda c: (-len(c[1]), c[0]))
        return top[0][0]
    return cands[0][0]


# User macros: \newcommand{\name}[n][default]{body}, \renewcommand, \providecommand, \def\name#1{body}

_NEWCMD_RE = re.compile(r"\\(?:re)?(?:newcommand|providecommand|DeclareRobustCommand)\*?\s*")
_DEF_RE = re.compile(r"\\(?:g|e|x)?def\s*\\([a-zA-Z@]+)\s*((?:#\d)*)\s*\{")
# never expand redefinitions of what the renderer must see as it is
_PROTECTED = set(HEADING_LEVELS) | {
    "title", "maketitle", "begin", "end", "item", "cite", "ref", "label", "input", "include",
    "document", "abstract", "footnote", "caption", "emph", "textbf", "textit", "newcommand", "def",
}


def _match_brace(s: str, i: int) -> int:
    """Index just past the group that opens at ``s[i] == '{'``; -1 if unbalanced."""
    depth = 0
    n = len(s)
    while i < n:
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return -1


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in " \t\n":
        i += 1
    return i


def _expandable(name: str, body: str) -> bool:
    """Simple macros only: not internal (``@``), not defining macros, and either balanced in
    environments or a bare ``\\begin{x}``/``\\end{x}`` shorthand (``\\be``/``\\ee``)."""
    if "@" in name or name in _PROTECTED or "\\def" in body or "\\newcommand" in body:
        return False
    nb, ne = len(re.findall(r"\\begin\s*\{", body)), len(re.findall(r"\\end\s*\{", body))
    if nb == ne:
        return nb == 0 or body.find("\\begin") < body.find("\\end")
    return re.fullmatch(r"\s*\\(begin|end)\s*\{[^{}]*\}\s*", body) is not None


def collect_macros(src: str) -> tuple[dict[str, tuple[int, str | None, str]], str]:
    """Find simple user macro definitions. Returns ``{name: (nargs, default_first_arg, body)}`` and the
    source with the definitions removed."""
    macros: dict[str, tuple[int, str | None, str]] = {}
    cuts = []
    for m in _NEWCMD_RE.finditer(src):
        i = m.end()
        if i < len(src) and src[i] == "{":
            j = _match_brace(src, i)
            if j < 0:
                continue
            name = src[i + 1:j - 1].strip()
        else:
            mm = re.match(r"\\[a-zA-Z@]+", src[i:])
            if not mm:
                continue
            name, j = mm.group(0), i + mm.end()
        if not re.fullmatch(r"\\[a-zA-Z@]+", name):
            continue
        j = _skip_ws(src, j)
        nargs, default = 0, None
        mm = re.match(r"\[\s*(\d)\s*\]", src[j:])
        if mm:
            nargs, j = int(mm.group(1)), _skip_ws(src, j + mm.end())
            if j < len(src) and src[j] == "[":
                k = src.find("]", j)
                if k < 0:
                    continue
                default, j = src[j + 1:k], _skip_ws(src, k + 1)
        if j >= len(src) or src[j] != "{":
            continue
        k = _match_brace(src, j)
        if k < 0:
            continue
        body = src[j + 1:k - 1]
        cuts.append((m.start(), k))
        if _expandable(name[1:], body):
            macros.setdefault(name[1:], (nargs, default, body))
    for m in _DEF_RE.finditer(src):
        j = m.end() - 1
        k = _match_brace(src, j)
        if k < 0:
            continue
        cuts.append((m.start(), k))
        name, nargs, body = m.group(1), len(m.group(2)) // 2, src[j + 1:k - 1]
        if _expandable(name, body):
            macros.setdefault(name, (nargs, None, body))
    if not cuts:
        return macros, src
    cuts.sort()
    out, last = [], 0
    for a, b in cuts:
        if a < last:
            continue
        out.append(src[last:a])
        last = b
    out.append(src[last:])
    return macros, "".join(out)


def _macro_args(src: str, i: int, nargs: int, default: str | None) -> tuple[list[str], int] | None:
    """The ``nargs`` arguments of a macro call whose name ends at ``i`` (the first optional in brackets
    when the macro has a ``default``; the others in braces or one token), and where the call ends;
    None for an unfinished call (a missing bracket or brace, or the end of the text)."""
    args = []
    for a in range(nargs):
        i2 = _skip_ws(src, i)
        if a == 0 and default is not None:
            if i2 < len(src) and src[i2] == "[":
                k = src.find("]", i2)
                if k < 0:
                    return None
                args.append(src[i2 + 1:k])
                i = k + 1
            else:
                args.append(default)
            continue
        if i2 < len(src) and src[i2] == "{":
            k = _match_brace(src, i2)
            if k < 0:
                return None
            args.append(src[i2 + 1:k - 1])
            i = k
        elif i2 < len(src):
            mm = re.match(r"\\[a-zA-Z@]+|\\.|.", src[i2:], re.S)
            args.append(mm.group(0))
            i = i2 + mm.end()
        else:
            return None
    return args, i


def expand_macros(src: str, macros: dict, max_passes: int = 8, max_chars: int = 20_000_000) -> str:
    """Expand user macros in ``src`` (arguments in braces, or one token), repeating while anything
    changed, at most ``max_passes`` times and never beyond ``max_chars``."""
    if not macros:
        return src
    # a macro that calls itself would only grow
    macros = {k: v for k, v in macros.items()
              if not re.search(r"\\" + re.escape(k) + r"(?![a-zA-Z@])", v[2])}
    if not macros:
        return src
    start_len = len(src)
    names = sorted(macros, key=len, reverse=True)
    pat = re.compile(r"\\(" + "|".join(re.escape(n) for n in names) + r")(?![a-zA-Z@])")
    for _ in range(max_passes):
        out, last, changed = [], 0, False
        for m in pat.finditer(src):
            if m.start() < last:
                continue
            # an escaped backslash before us means this is not a macro call
            b = m.start()
            while b > 0 and src[b - 1] == "\\":
                b -= 1
            if (m.start() - b) % 2:
                continue
            nargs, default, body = macros[m.group(1)]
            read = _macro_args(src, m.end(), nargs, default)
            if read is None:
                continue
            args, i = read
            rep = re.sub(r"#(\d)", lambda g: args[int(g.group(1)) - 1]
                         if 0 < int(g.group(1)) <= len(args) else "", body)
            out.append(src[last:m.start()])
            # keep a following letter from gluing onto a macro at the end of the body
            out.append(rep + (" " if nargs == 0 and re.search(r"\\[a-zA-Z@]+$", rep) else ""))
            last, changed = i, True
        if not changed:
            break
        out.append(src[last:])
        new = "".join(out)
        if len(new) > max_chars or len(new) > 4 * start_len + 1_000_000:
            break  # a macro that keeps growing: keep the last pass, best effort
        src = new
    return src


# --------------------------------------------------------------------------------------------------
# parsing and rendering with pylatexenc

_DISCARD_ENVS = [
    "figure", "figure*", "table", "table*", "tabular", "tabular*", "tabularx", "longtable", "tabulary",
    "wrapfigure", "wraptable", "sidewaysfigure", "sidewaystable", "subfigure", "subtable",
    "tikzpicture", "picture", "pspicture", "algorithm", "algorithm*", "algorithmic", "lstlisting",
    "verbatim", "verbatim*", "Verbatim", "BVerbatim", "LVerbatim", "minted", "alltt", "filecontents",
    "filecontents*", "thebibliography", "comment", "tcolorbox", "forest", "circuitikz", "quantikz",
    "xy", "CD", "tabbing", "lstinputlisting", "sourcecode", "code", "example", "lrbox",
]
_MATH_ENVS = [
    "equation", "equation*", "align", "align*", "alignat", "alignat*", "flalign", "flalign*",
    "eqnarray", "eqnarray*", "gather", "gather*", "multline", "multline*", "displaymath", "math",
    "dmath", "dmath*", "dgroup", "dgroup*", "subequations", "split", "IEEEeqnarray", "IEEEeqnarray*",
    "array", "matrix", "pmatrix", "bmatrix", "cases",
]
# macros whose arguments are not prose: dropped together with their arguments
_DISCARD_MACROS = {
    "label": "{", "bibliography": "{", "bibliographystyle": "{", "usepackage": "[{",
    "RequirePackage": "[{", "documentclass": "[{", "includegraphics": "*[[{", "vspace": "*{",
    "hspace": "*{", "setlength": "{{", "addtolength": "{{", "setcounter": "{{", "addtocounter": "{{",
    "newtheorem": "*{[{[", "newenvironment": "*{[[{{", "renewenvironment": "*{[[{{",
    "newcounter": "{[", "definecolor": "{{{", "hypersetup": "{", "graphicspath": "{",
    "pagestyle": "{", "thispagestyle": "{", "author": "[{", "date": "{", "thanks": "{",
    "affiliation": "[{", "affil": "[{", "address": "[{", "email": "{", "institute": "{",
    "keywords": "{", "pacs": "{", "footnote": "[{", "footnotetext": "[{", "caption": "*[{",
    "captionof": "*{[{", "index": "{", "nocite": "{", "linespread": "{", "color": "[{",
    "maketitle": "", "tableofcontents": "", "listoffigures": "", "listoftables": "",
    "printbibliography": "[", "addbibresource": "[{", "newpage": "", "clearpage": "",
    "centering": "", "noindent": "", "bigskip": "", "medskip": "", "smallskip": "",
    "appendix": "", "makeatletter": "", "makeatother": "", "let": "", "pagenumbering": "{",
    "setcitestyle": "{", "newlength": "{", "DeclareMathOperator": "*{{", "numberwithin": "{{",
    "theoremstyle": "{", "urlstyle": "{", "allowdisplaybreaks": "[", "onecolumn": "",
    "twocolumn": "[", "input": "{", "include": "{", "acknowledgments": "", "vskip": "",
    "hskip": "", "vfill": "", "hfill": "", "protect": "", "ignorespaces": "", "relax": "",
    "selectlanguage": "{", "AtBeginDocument": "{", "ProvidesPackage": "{[", "ProvidesFile": "{[",
    "NeedsTeXFormat": "{[", "fontsize": "{{", "selectfont": "", "lstset": "{", "sisetup": "{",
    "tikzset": "{", "pgfplotsset": "{", "usetikzlibrary": "{", "newif": "",
    "markboth": "{{", "markright": "{", "titlerunning": "{", "authorrunning": "{",
    "subtitle": "{", "orcid": "{", "correspondingauthor": "{", "runningtitle": "{",
}
_LOGOS = {
    "LaTeX": "LaTeX", "TeX": "TeX", "LaTeXe": "LaTeX2e", "BibTeX": "BibTeX", "AmS": "AMS",
    "AmSTeX": "AMS-TeX", "XeTeX": "XeTeX", "LuaTeX": "LuaTeX", "pdfTeX": "pdfTeX", "eTeX": "e-TeX",
    "ConTeXt": "ConTeXt", "MF": "Metafont", "MP": "MetaPost", "etal": "et al.", "ie": "i.e.",
    "eg": "e.g.", "etc": "etc.", "textbackslash": "\\",
}
# formatting macros whose argument is prose (pylatexenc's text renderer would drop it)
_KEEP_MACROS = ["texttt", "textsf", "textmd", "textup", "textnormal", "mbox", "underline", "uline",
                "textsuperscript", "textsubscript", "fbox", "sout", "hl", "textsc", "textsl", "emph",
                "textbf", "textit", "textrm", "text", "ensuremath", "MakeUppercase", "MakeLowercase",
                "textls"]
_CITE_MACROS = ["cite", "citep", "citet", "citealp", "citealt", "citeauthor", "citeyear", "Cite",
                "Citep", "Citet", "parencite", "textcite", "autocite", "footcite", "citenum"]
_REF_MACROS = ["ref", "eqref", "autoref", "cref", "Cref", "pageref", "vref", "nameref", "Autoref",
               "cpageref", "Cpageref", "subref"]


def _marked(kind: str, text: str) -> str:
    text = " ".join(text.split())
    if not text:
        return ""
    return f"\n\n{_OPEN}{_KIND_CODE[kind]}{text}{_CLOSE}\n\n"


class _Renderer(LatexNodes2Text):
    """LatexNodes2Text with placeholders for math and marker characters around structure."""

    def math_node_to_text(self, node):
        return f" {MATH} "


def _heading(kind):
    def fmt(n, l2tobj):
        args = n.nodeargd.argnlist if n.nodeargd else []
        return _marked(kind, l2tobj.nodelist_to_text([args[-1]]) if args and args[-1] else "")
    return fmt


def _abstract_env(n, l2tobj):
    return _marked("abstract", l2tobj.nodelist_to_text(n.nodelist))


def _title_macro(n, l2tobj):
    args = n.nodeargd.argnlist if n.nodeargd else []
    if args and args[-1] is not None:
        l2tobj.doc_title = " ".join(l2tobj.nodelist_to_text([args[-1]]).split())
    return ""


def _keep_arg(k):
    return lambda n, l2tobj: l2tobj.node_arg_to_text(n, k)


def _build_contexts():
    wdb = walker_default_db()
    wdb.add_context_category("longctx", prepend=True, macros=[
        MacroSpec(name, spec) for name, spec in _DISCARD_MACROS.items() if wdb.get_macro_spec(name) is None
    ] + [MacroSpec(name, "{") for name in _KEEP_MACROS if wdb.get_macro_spec(name) is None] + [MacroSpec(h, "*[{") for h in HEADING_LEVELS] + [
        MacroSpec("title", "[{"), MacroSpec("abstract", "{"), MacroSpec("href", "[{{"),
        MacroSpec("texorpdfstring", "{{"), MacroSpec("url", "{"), MacroSpec("textcolor", "[{{"),
    ] + [MacroSpec(c, "*[[{") for c in _CITE_MACROS] + [MacroSpec(r, "*{") for r in _REF_MACROS],
        environments=[EnvironmentSpec(e, "[[{") for e in ("figure", "figure*", "table", "table*")]
        + [EnvironmentSpec(e, "{") for e in ("tabular",)] + [EnvironmentSpec(e, "{{") for e in ("tabular*", "tabularx")]
        + [EnvironmentSpec(e, "", is_math_mode=True) for e in _MATH_ENVS if not wdb.get_environment_spec(e)],
    )
    ldb = l2t_default_db()
    ldb.add_context_category("longctx", prepend=True, macros=[
        MacroTextSpec(name, discard=True) for name in _DISCARD_MACROS
    ] + [MacroTextSpec(h, simplify_repl=_heading(h)) for h in HEADING_LEVELS] + [
        MacroTextSpec("title", simplify_repl=_title_macro),
        MacroTextSpec("abstract", simplify_repl=lambda n, l2tobj: _marked("abstract", l2tobj.node_arg_to_text(n, 0))),
        MacroTextSpec("href", simplify_repl=_keep_arg(2)),
        MacroTextSpec("texorpdfstring", simplify_repl=_keep_arg(0)),
        MacroTextSpec("url", simplify_repl=_keep_arg(0)),
        MacroTextSpec("textcolor", simplify_repl=_keep_arg(2)),
        MacroTextSpec("verb", simplify_repl=f" {CODE} "),
        MacroTextSpec("\\", simplify_repl="\n"),
    ] + [MacroTextSpec(k, simplify_repl=v) for k, v in _LOGOS.items()]
        + [MacroTextSpec(k, discard=False) for k in _KEEP_MACROS]
        + [MacroTextSpec(c, simplify_repl=f" {CITE}") for c in _CITE_MACROS]
        + [MacroTextSpec(r, simplify_repl=f" {REF}") for r in _REF_MACROS],
        environments=[EnvironmentTextSpec(e, discard=True) for e in _DISCARD_ENVS]
        + [EnvironmentTextSpec(e, simplify_repl=f" {MATH} ") for e in _MATH_ENVS]
        + [EnvironmentTextSpec("abstract", simplify_repl=_abstract_env)],
    )
    return wdb, ldb


_CONTEXTS = None


def _contexts():
    global _CONTEXTS
    if _CONTEXTS is None:
        _CONTEXTS = _build_contexts()
    return _CONTEXTS


def _render(src: str) -> tuple[str, str | None]:
    wdb, ldb = _contexts()
    walker = LatexWalker(src, latex_context=wdb, tolerant_parsing=True)
    nodes, _, _ = walker.get_latex_nodes()
    r = _Renderer(latex_context=ldb, math_mode="remove", keep_comments=False)
    r.doc_title = None
    return r.nodelist_to_text(nodes), r.doc_title


_WS_RE = re.compile(r"[ \t\r\f\v\u00a0\u2000-\u200b]+")


def _clean(text: str) -> str:
    text = _WS_RE.sub(" ", text)
    text = re.sub(r" *\n *", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    # a placeholder left alone between spaces is fine; stray braces from broken groups are not prose
    text = re.sub(r"(?<!\\)[{}]", "", text)
    text = re.sub(r" {2,}", " ", text)
    return text.strip()


def _extract_spans(marked: str) -> tuple[str, list[dict]]:
    out, spans = [], []
    pos, i, n = 0, 0, len(marked)
    while i < n:
        j = marked.find(_OPEN, i)
        if j < 0:
            chunk = marked[i:].replace(_CLOSE, "")
            out.append(chunk)
            pos += len(chunk)
            break
        chunk = marked[i:j].replace(_CLOSE, "")
        out.append(chunk)
        pos += len(chunk)
        kind = _CODE_KIND.get(marked[j + 1:j + 2]) if j + 1 < n else None
        k = marked.find(_CLOSE, j + 2)
        if kind is None or k < 0:
            i = j + 1
            continue
        inner = _PRIVATE_RE.sub("", marked[j + 2:k]).strip()
        if inner:
            spans.append({"kind": kind, "level": HEADING_LEVELS.get(kind, 0), "start": pos,
                          "end": pos + len(inner)})
            out.append(inner)
            pos += len(inner)
        i = k + 1
    return "".join(out), spans


# Peak memory of parsing and rendering, measured with pylatexenc on 400 KB inputs (VmHWM): `\\x` repeated
# 122 MB (320 B per byte), `$a$` 117 MB, `{a}` 86 MB, prose with a macro, a group and math per sentence
# 25 MB. Every parse node (one per backslash, brace or dollar) costs up to ~600 bytes, the characters
# between them ~50 bytes each; the constants below are rounded up so the estimate stays an upper bound.
_PARSE_BYTES_PER_NODE = 640
_PARSE_BYTES_PER_CHAR = 64
_NODE_RE = re.compile(r"[\\{$]")


def estimate_parse_memory(src: str) -> int:
    """An upper estimate, in bytes, of the memory that parsing and rendering ``src`` takes."""
    return _PARSE_BYTES_PER_NODE * len(_NODE_RE.findall(src)) + _PARSE_BYTES_PER_CHAR * len(src)


def convert(files: dict[str, str], main: str | None = None, max_chars: int = 20_000_000,
            max_memory: int | None = None) -> Document:
    """Convert one paper, given as ``{relative path: LaTeX text}``, to a :class:`Document`. With
    ``max_memory`` (bytes), a paper whose parse is estimated to need more is rejected before parsing."""
    files = {k: _PRIVATE_RE.sub("", v) for k, v in files.items()}
    main = main or find_main_file(files)
    missing: list[str] = []
    src = inline_inputs(files, main, max_chars=max_chars, missing=missing)
    if len(src) > max_chars:
        raise Rejected("too-large", f"LaTeX source exceeds {max_chars} characters")
    b = _search_outside_verbatim(_BEGIN_DOC_RE, src)
    if not b:
        raise Rejected("no-main-file", "no \\begin{document}")
    preamble, body = src[:b.start()], src[b.end():]
    e = _search_outside_verbatim(_END_DOC_RE, body)
    if e:
        body = body[:e.start()]
    macros, preamble = collect_macros(preamble)
    body_macros, body = collect_macros(body)
    for k, v in body_macros.items():
        macros.setdefault(k, v)
    body = expand_macros(body, macros, max_chars=max_chars)
    if max_memory is not None and (need := estimate_parse_memory(body)) > max_memory:
        raise Rejected("too-large", f"parsing its {len(body):,} characters of LaTeX may need about "
                                    f"{need / 2**20:,.0f} MiB, over the {max_memory / 2**20:,.0f} MiB cap")
    # the title lives in the preamble as often as in the body: render the preamble's \title only
    title = None
    for m in re.finditer(r"\\title(?![a-zA-Z@])", preamble):
        _, title = _render(expand_macros(preamble[m.start():], macros, max_chars=max_chars)[:20000]
                           .split("\\author")[0])
        if title:
            break
    abstract_src = ""
    if not re.search(r"\\begin\s*\{abstract\}|\\abstract\s*\{", body):
        m = re.search(r"\\begin\s*\{abstract\}.*?\\end\s*\{abstract\}|\\abstract\s*\{", preamble, re.S)
        if m:
            abstract_src = preamble[m.start():]
            if abstract_src.startswith("\\abstract"):
                k = _match_brace(abstract_src, abstract_src.index("{"))
                abstract_src = abstract_src[:k] if k > 0 else ""
            else:
                abstract_src = m.group(0)
    text, body_title = _render(abstract_src + "\n\n" + body)
    title = title or body_title or ""
    marked = (_marked("title", title) if title else "") + text
    text, spans = _extract_spans(_clean(marked))
    # _clean cannot touch marker characters, so spans survive it; strip() may move the start
    lead = len(text) - len(text.lstrip())
    if lead:
        text = text[lead:]
        for s in spans:
            s["start"] -= lead
            s["end"] -= lead
    return Document(title=" ".join(title.split()), text=text, structure=spans, main_file=main,
                    missing_inputs=missing)
