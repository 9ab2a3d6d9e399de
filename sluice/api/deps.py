"""What the routes receive: the app's settings, its service :class:`~sluice.service.Client`
and its request metrics, built once by :func:`sluice.api.create_api` and kept on the app."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, cast

from fastapi import Depends, FastAPI, Request

from sluice.config import Settings
from sluice.metrics import ApiMetrics
from sluice.service import Client


@dataclass(frozen=True, slots=True)
class ApiState:
    settings: Settings
    client: Client
    metrics: ApiMetrics

    def attach(self, app: FastAPI) -> None:
        app.state.sluice = self

    @staticmethod
    def of(request: Request) -> ApiState:
        return cast(ApiState, request.app.state.sluice)


def client(request: Request) -> Client:
    return ApiState.of(request).client


def settings(request: Request) -> Settings:
    return ApiState.of(request).settings


ClientDep = Annotated[Client, Depends(client)]
SettingsDep = Annotated[Settings, Depends(settings)]
