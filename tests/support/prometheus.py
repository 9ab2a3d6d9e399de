"""Scraping Prometheus endpoints in tests: the text is read by prometheus_client's own parser."""

from __future__ import annotations

import math
from collections.abc import Iterable

import httpx
from prometheus_client.parser import text_string_to_metric_families


class Samples:
    """The samples of one or more scrapes, added up (the same series of two workers sum)."""

    def __init__(self, texts: Iterable[str] = ()) -> None:
        self.values: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        self.types: dict[str, str] = {}
        for text in texts:
            self.add(text)

    def add(self, text: str) -> None:
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                key = (sample.name, frozenset(sample.labels.items()))
                self.values[key] = self.values.get(key, 0.0) + sample.value

    def series(self, name: str, **labels: str) -> dict[frozenset[tuple[str, str]], float]:
        """Every series of ``name`` whose labels include ``labels``."""
        wanted = set(labels.items())
        return {
            found: value
            for (sample, found), value in self.values.items()
            if sample == name and wanted <= found
        }

    def total(self, name: str, **labels: str) -> float:
        """The sum of every series of ``name`` whose labels include ``labels`` (0 if none)."""
        return sum(v for v in self.series(name, **labels).values() if not math.isnan(v))

    def has(self, name: str, **labels: str) -> bool:
        return bool(self.series(name, **labels))

    def names(self) -> set[str]:
        """Every metric name a query may use: counters with _total, histograms with _bucket,
        _count and _sum (a family with no series yet included)."""
        found = set()
        for family, kind in self.types.items():
            found.add(family + "_total" if kind == "counter" else family)
            if kind == "histogram":
                found |= {f"{family}_bucket", f"{family}_count", f"{family}_sum"}
        return found


def scrape(*urls: str, headers: dict[str, str] | None = None) -> Samples:
    """GET every URL (each must answer 200 with the Prometheus text format) and add them up."""
    texts = []
    for url in urls:
        response = httpx.get(url, headers=headers, timeout=30)
        assert response.status_code == 200, f"{url}: {response.status_code} {response.text}"
        assert response.headers["content-type"].startswith("text/plain"), response.headers
        texts.append(response.text)
    return Samples(texts)
