"""An importer of your own, loaded from this folder by the Docker image (docs/deploy.md).

docker-compose.yml mounts ./importers at /app/importers, which is on the image's PYTHONPATH:
name the module in SLUICE_IMPORTERS (``SLUICE_IMPORTERS=importers.example``, comma-separated
for more) and the workers and the API register every ``Importer`` defined at its top level.
The workers create the target table at start.
"""

from __future__ import annotations

from sluice.schemas.importers import Field, Importer

contacts = Importer(
    slug="contacts",
    description="Contacts keyed by e-mail address (an example of a mounted importer)",
    table="contacts",
    key=("email",),
    fields=(
        Field("email", "text", aliases=("e-mail", "mail"), required=True),
        Field("name", "text", aliases=("full name",)),
        Field("company", "text", aliases=("organisation", "organization")),
        Field("signed_up", "date", aliases=("signup date",)),
    ),
)
