"""The lab's web page (/ui): server-rendered pages over the same store and queue as the JSON API."""

from __future__ import annotations

from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.router import Router
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig

from service.api.ui.controller import UiController

HERE = Path(__file__).parent


def ui_template_config() -> TemplateConfig[JinjaTemplateEngine]:
    """Jinja2 with autoescaping on: prompts, job names and tags are user text."""
    environment = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(["html", "jinja"], default=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return TemplateConfig(engine=JinjaTemplateEngine.from_environment(environment))


def ui_handlers() -> list[type[UiController] | Router]:
    """The page routes and their static files (CSS, the progress script), all served by this process."""
    static = create_static_files_router(
        path="/ui/static",
        directories=[HERE / "static"],
        opt={"exclude_from_auth": True},
        include_in_schema=False,
        name="ui-static",
    )
    return [UiController, static]
