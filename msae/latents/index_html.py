"""A static index page of latent cards: one self-contained HTML file (inline CSS and a few lines of
JS, no network), so it opens from file:// next to the cards it links by relative path.

The filter box keeps cards whose text (latent id, stats, concepts, modality) contains every typed
word; ``index.html#q=words`` pre-fills it, which also lets a headless browser test the filter.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

from msae.latents.evidence import latents_dir
from msae.store import Store

_CSS = """
body{font-family:system-ui,sans-serif;margin:16px;background:#fafafa;color:#222}
header{display:flex;gap:16px;align-items:baseline;flex-wrap:wrap}
#filter{font-size:15px;padding:4px 8px;width:320px}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:12px;margin-top:12px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px;margin:0}
.card img{width:100%;height:auto;border:1px solid #eee}
.card h2{font-size:16px;margin:4px 0}
.stats{display:grid;grid-template-columns:auto 1fr;gap:0 8px;font-size:12px;margin:4px 0}
.stats dt{color:#777}.stats dd{margin:0}
.concept{font-size:13px;margin:2px 0}
.modality{display:inline-block;font-size:11px;padding:1px 6px;border-radius:8px;background:#eee}
.modality-visual{background:#d7e9ff}.modality-textual{background:#ffe3c7}.modality-multimodal{background:#dcf5d0}
"""

_JS = """
(function(){
  var box=document.getElementById('filter'), count=document.getElementById('count');
  var cards=Array.prototype.slice.call(document.querySelectorAll('.card'));
  function apply(){
    var terms=box.value.toLowerCase().split(/\\s+/).filter(function(t){return t.length>0;});
    var shown=0;
    cards.forEach(function(card){
      var text=card.getAttribute('data-search');
      var ok=terms.every(function(t){return text.indexOf(t)>=0;});
      card.hidden=!ok; if(ok){shown++;}
    });
    count.textContent=shown+' of '+cards.length+' shown';
  }
  var hash=window.location.hash;
  if(hash.indexOf('#q=')===0){box.value=decodeURIComponent(hash.slice(3));}
  box.addEventListener('input',apply);
  apply();
})();
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _search_text(entry: Mapping[str, Any]) -> str:
    """What the filter matches: id, stats, concepts, modality — lower-cased."""
    parts = [f"latent {entry['latent']}", str(entry["latent"])]
    parts += [f"{k} {v}" for k, v in (entry.get("stats") or {}).items()]
    parts += [str(entry[k]) for k in ("concept_visual", "concept_textual", "modality") if entry.get(k)]
    return " ".join(parts).lower()


def _card_html(entry: Mapping[str, Any]) -> str:
    href = _e(quote(str(entry["card"]), safe="/"))
    latent = _e(entry["latent"])
    stats = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in (entry.get("stats") or {}).items())
    concepts = "".join(
        f'<p class="concept"><b>{label}:</b> {_e(entry[key])}</p>'
        for key, label in (("concept_visual", "visual"), ("concept_textual", "textual")) if entry.get(key))
    modality = entry.get("modality")
    badge = (f'<span class="modality modality-{_e(str(modality).lower())}">{_e(modality)}</span>'
             if modality else "")
    return (f'<figure class="card" id="latent-{latent}" data-latent="{latent}" '
            f'data-search="{_e(_search_text(entry))}">'
            f'<a href="{href}"><img src="{href}" alt="card of latent {latent}" loading="lazy"></a>'
            f'<figcaption><h2>latent {latent} {badge}</h2><dl class="stats">{stats}</dl>{concepts}'
            f"</figcaption></figure>")


def build_index(entries: Sequence[Mapping[str, Any]], title: str) -> str:
    """The index page. entries: dicts with latent, card (path relative to the page), stats (dict of
    short strings) and optionally concept_visual, concept_textual, modality."""
    cards = "\n".join(_card_html(entry) for entry in entries)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        f"<header><h1>{_e(title)}</h1>"
        '<input id="filter" type="search" placeholder="filter: id, concept, modality…" autofocus>'
        f'<span id="count">{len(entries)} of {len(entries)} shown</span></header>\n'
        f'<main id="grid">\n{cards}\n</main>\n<script>{_JS}</script>\n</body></html>\n'
    )


def write_index(store: Store, layer: int, width: int, entries: Sequence[Mapping[str, Any]],
                title: str | None = None) -> str:
    """Write ``<latents_dir>/index.html`` and return its name relative to the store root."""
    name = f"{latents_dir(layer, width)}/index.html"
    page = build_index(entries, title or f"SAE latents — layer {layer}, width {width}")
    store.write_bytes(page.encode("utf-8"), name)
    return name
