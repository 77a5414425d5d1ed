"""Explainer prompts as versioned text templates, rendered to chat messages.

Why templates in files: the prompt is part of what an answer depends on, so its exact text is
hashed into ``prompt_version`` (stored with every answer and in the cache key); editing a file
invalidates exactly the answers it shaped. A user can override any template with
``explainer.prompt_dir`` without touching code.

Template file format: three sections, each opened by a marker line::

    [[instructions]]   what the explainer must do (sent first)
    [[example]]        one per example, after its image; $index, $n, $text are filled in
    [[closing]]        the final reminder of the answer format

``$n`` (number of examples) works in every section; substitution uses :class:`string.Template`
so braces in a prompt need no escaping (write ``$$`` for a literal dollar sign).

File names: ``<kind>_<prompting>.txt`` (e.g. ``visual_masked.txt``), falling back to
``<kind>.txt``. The built-ins share ``textual.txt`` for both promptings: for textual concepts the
two modes differ only in which images ride along as marginal context, and those come with the
request, not the prompt. A ``prompt_dir`` may hold any subset; missing files use the built-ins.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template

from msae.explain.base import ConceptKind, ExplainRequest, Prompting

KINDS: tuple[ConceptKind, ...] = ("visual", "textual")
PROMPTINGS: tuple[Prompting, ...] = ("masked", "whole")
SECTIONS = ("instructions", "example", "closing")
_MARKER = re.compile(r"^\[\[(\w+)\]\][ \t]*$", re.MULTILINE)


class TemplateError(ValueError):
    """A template file that cannot be used; the message names the file."""


@dataclass(frozen=True)
class PromptTemplate:
    """One parsed template file plus the version hash of its exact text."""

    name: str
    """File name it came from (e.g. textual.txt)."""
    source: str
    """'builtin' or the override folder."""
    text: str
    instructions: str
    example: str
    closing: str

    @property
    def version(self) -> str:
        return prompt_version(self.text)


def prompt_version(template_text: str) -> str:
    """Short sha256 of a template's text (line endings normalised so a checkout on Windows agrees)."""
    norm = template_text.replace("\r\n", "\n")
    return hashlib.sha256(norm.encode("utf-8")).hexdigest()[:12]


EXPLAINER_PLACEHOLDERS = ("index", "n", "text")


def parse_sections(text: str, name: str, placeholders: tuple[str, ...] = EXPLAINER_PLACEHOLDERS) -> dict[str, str]:
    """Split a ``[[section]]`` template file into its sections (each present exactly once, non-empty)
    and check that every ``$placeholder`` in them is one of ``placeholders``. Shared by the
    explainer prompts and the judge prompts (msae.score.autointerp)."""
    text = text.replace("\r\n", "\n")
    markers = list(_MARKER.finditer(text))
    found: dict[str, str] = {}
    for i, m in enumerate(markers):
        key = m.group(1)
        if key not in SECTIONS:
            raise TemplateError(f"{name}: unknown section [[{key}]] (expected {', '.join(SECTIONS)})")
        if key in found:
            raise TemplateError(f"{name}: section [[{key}]] appears twice")
        end = markers[i + 1].start() if i + 1 < len(markers) else len(text)
        found[key] = text[m.end():end].strip("\n")
    missing = [s for s in SECTIONS if not found.get(s, "").strip()]
    if missing:
        raise TemplateError(f"{name}: missing or empty section(s) {', '.join(f'[[{s}]]' for s in missing)}")
    sample = {p: 1 if p in ("index", "n") else "" for p in placeholders}
    for key, body in found.items():
        try:
            Template(body).substitute(sample)
        except (KeyError, ValueError) as err:
            raise TemplateError(f"{name}: section [[{key}]] has a bad placeholder ({err}); "
                                f"allowed: {', '.join('$' + p for p in placeholders)}") from None
    return found


def parse_template(text: str, name: str = "<template>", source: str = "builtin") -> PromptTemplate:
    """Split an explainer template file into its sections; every section must be present exactly once."""
    text = text.replace("\r\n", "\n")
    return PromptTemplate(name=name, source=source, text=text, **parse_sections(text, name))


def _candidates(kind: str, prompting: str) -> tuple[str, str]:
    return f"{kind}_{prompting}.txt", f"{kind}.txt"


def load_templates(prompt_dir: str | None = None) -> dict[tuple[ConceptKind, Prompting], PromptTemplate]:
    """Templates for every (kind, prompting): the override folder first, then the built-ins."""
    builtin = resources.files("msae.explain").joinpath("templates")
    override = Path(prompt_dir) if prompt_dir else None
    if override is not None and not override.is_dir():
        raise TemplateError(f"explainer.prompt_dir={prompt_dir!r} is not a folder")
    out: dict[tuple[ConceptKind, Prompting], PromptTemplate] = {}
    for kind in KINDS:
        for prompting in PROMPTINGS:
            template = None
            for name in _candidates(kind, prompting):
                if override is not None and (override / name).is_file():
                    template = parse_template((override / name).read_text(encoding="utf-8"), name, str(override))
                    break
            if template is None:
                for name in _candidates(kind, prompting):
                    res = builtin.joinpath(name)
                    if res.is_file():
                        template = parse_template(res.read_text(encoding="utf-8"), name, "builtin")
                        break
            if template is None:
                raise TemplateError(f"no template for {kind}/{prompting} (looked for {_candidates(kind, prompting)})")
            out[(kind, prompting)] = template
    return out


# --- rendering ------------------------------------------------------------------------------------
Part = tuple[str, str | bytes]
"""('text', str) or ('image', png bytes): a backend-neutral prompt piece."""


def build_parts(request: ExplainRequest, templates: dict) -> list[Part]:
    """The prompt as an ordered list of text and image pieces; both backends render from this.

    Order: instructions, then per example its image (if any) followed by its text, then the
    closing reminder. Empty example texts still get their label so images stay numbered.
    """
    template: PromptTemplate = templates[(request.kind, request.prompting)]
    n = len(request.examples)
    parts: list[Part] = [("text", Template(template.instructions).substitute(n=n, index=0, text=""))]
    for i, ex in enumerate(request.examples, start=1):
        if ex.image_png is not None:
            parts.append(("image", ex.image_png))
        text = " ".join(ex.text.split()) if ex.text else "(none)"
        parts.append(("text", Template(template.example).substitute(n=n, index=i, text=text)))
    parts.append(("text", Template(template.closing).substitute(n=n, index=0, text="")))
    return parts


def png_data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def build_messages(request: ExplainRequest, templates: dict) -> list[dict]:
    """OpenAI chat messages: one user turn holding the text parts and the images as data URLs.

    A single user turn (no system message) is the form every OpenAI-compatible VLM server
    accepts; some multimodal chat templates reject system turns.
    """
    content: list[dict] = []
    for kind, value in build_parts(request, templates):
        if kind == "image":
            content.append({"type": "image_url", "image_url": {"url": png_data_url(value)}})  # type: ignore[arg-type]
        else:
            content.append({"type": "text", "text": value})
    return [{"role": "user", "content": content}]
