"""Bundled importers, used by ``make demo`` and as examples to copy."""

from __future__ import annotations

from sluice.schemas.importers import Field, Importer, Unpivot

products = Importer(
    slug="products",
    description="Product catalogue keyed by SKU",
    table="products",
    key=("sku",),
    fields=(
        Field("sku", "text", aliases=("SKU", "sku code", "item number")),
        Field("name", "text", aliases=("product name", "title"), required=True),
        Field("category", "text"),
        Field("price", "numeric", aliases=("unit price",), required=True),
        Field("stock", "integer", aliases=("qty", "quantity")),
        Field("released", "date", aliases=("release date",)),
    ),
)

meter_readings = Importer(
    slug="meter_readings",
    description="Half-hourly meter readings: 48 columns HH01..HH48 per meter and day",
    table="meter_readings",
    key=("meter", "day", "period"),
    fields=(
        Field("meter", "text", aliases=("MPAN", "meter id", "meter_id")),
        Field("day", "date", aliases=("date", "reading date")),
    ),
    unpivot=Unpivot(columns=r"HH(\d{2})", index_field="period", value_field="kwh"),
    batch_size=2000,
)
