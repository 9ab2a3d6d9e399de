"""Bundled importers, used by ``make demo`` and as examples to copy."""

from __future__ import annotations

from sluice.schemas.importers import EmptyCell, Field, Importer, Unpivot

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

# An empty half-hour is a gap (no reading, counted by the run); say empty="null" to land it as
# a NULL reading or empty="reject" to reject the day's row.
meter_readings = Importer(
    slug="meter_readings",
    description="Half-hourly meter readings: 48 columns HH01..HH48 per meter and day",
    table="meter_readings",
    key=("meter", "day", "period"),
    fields=(
        Field("meter", "text", aliases=("MPAN", "meter id", "meter_id")),
        Field("day", "date", aliases=("date", "reading date")),
    ),
    unpivot=Unpivot(
        columns=r"HH(\d{2})", index_field="period", value_field="kwh", empty=EmptyCell.GAP
    ),
    batch_size=2000,
)

daily_readings = Importer(
    slug="daily_readings",
    description="Daily meter readings: one row per meter and day (MPAN, Date, Reading)",
    table="daily_readings",
    key=("meter", "day"),
    fields=(
        Field("meter", "text", aliases=("MPAN", "meter id", "meter_id")),
        Field("day", "date", aliases=("date", "reading date")),
        Field("reading", "numeric", aliases=("kwh", "value"), required=True),
    ),
)
