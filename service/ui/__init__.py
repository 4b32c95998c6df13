"""The web dashboard at `/ui`: server-rendered page shells (Jinja2) and small static files.

The pages hold no tenant data when served: the API token lives in the tab's sessionStorage and the page's script
sends it as the Bearer header to the same JSON API that every other client uses, so the dashboard sees exactly what
the token's tenant sees and nothing is rendered for a request without a token. Not in the OpenAPI schema.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.templating import Jinja2Templates

from core.errors import NotFound
from core.statuses import STATUSES

HERE = resources.files(__name__)
templates = Jinja2Templates(directory=str(HERE / "templates"))
STATIC = {p.name: p for p in (HERE / "static").iterdir() if p.suffix in {".css", ".js", ".svg"}}
MEDIA = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}
# Scripts only from this origin, no inline code, nothing framed: a token in sessionStorage is only as safe as the
# page that reads it.
HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                                      "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; "
                                      "base-uri 'none'; form-action 'self'",
           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}

router = APIRouter(prefix="/ui", include_in_schema=False)


def page(request: Request, template: str, title: str, **context) -> HTMLResponse:
    return templates.TemplateResponse(request, template, {"title": title, "statuses": STATUSES, **context},
                                      headers=HEADERS)


@router.get("", response_class=HTMLResponse)
def lineages_page(request: Request) -> HTMLResponse:
    return page(request, "lineages.html", "Lineages", nav="lineages")


@router.get("/signin", response_class=HTMLResponse)
def signin_page(request: Request) -> HTMLResponse:
    return page(request, "signin.html", "Sign in", nav="signin")


@router.get("/lineages/{name}", response_class=HTMLResponse)
def lineage_page(request: Request, name: str) -> HTMLResponse:
    return page(request, "lineage.html", f"Lineage {name}", nav="lineages", name=name)


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request) -> HTMLResponse:
    return page(request, "jobs.html", "Jobs", nav="jobs")


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: str) -> HTMLResponse:
    return page(request, "job.html", f"Job {job_id}", nav="jobs", job_id=job_id)


@router.get("/submit", response_class=HTMLResponse)
def submit_page(request: Request) -> HTMLResponse:
    return page(request, "submit.html", "Submit a job", nav="submit")


@router.get("/static/{name}")
def static_file(name: str) -> FileResponse:
    path = STATIC.get(name)
    if path is None:
        raise NotFound(f"no static file {name!r}", param="name")
    return FileResponse(str(path), media_type=MEDIA[path.suffix], headers={"Cache-Control": "max-age=300",
                                                                          "X-Content-Type-Options": "nosniff"})
