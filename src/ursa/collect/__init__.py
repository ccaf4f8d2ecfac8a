"""Collect a dataset: read URL lists, search for images, download them into class folders with a manifest.

Names are imported lazily, so reading URL lists or the manifest does not import httpx.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> module that defines it
_EXPORTS = {
    "UrlList": "ursa.collect.urls",
    "read_url_list": "ursa.collect.urls",
    "parse_url_text": "ursa.collect.urls",
    "class_name_for_list": "ursa.collect.urls",
    "Manifest": "ursa.collect.manifest",
    "manifest_path": "ursa.collect.manifest",
    "SearchResult": "ursa.collect.search",
    "SearchProvider": "ursa.collect.search",
    "DuckDuckGoProvider": "ursa.collect.search",
    "search_images": "ursa.collect.search",
    "Job": "ursa.collect.download",
    "download": "ursa.collect.download",
    "jobs_from_list": "ursa.collect.download",
    "jobs_from_search": "ursa.collect.download",
    "DownloadReport": "ursa.collect.download",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ursa.collect' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
