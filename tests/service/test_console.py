"""The web console as people use it, over HTTP: sign-in through the real OIDC provider, pages
that show only what the signed-in person may do, actions that need the session's CSRF token
and the permission, whatever the page showed."""

from __future__ import annotations

import uuid

import httpx

from tests.console_signin import console_sign_in, set_cookie
from tests.service.conftest import Server, gated_pipeline, sign_in

EX = "/api/v1/executions"
C = "/console/executions"


def _waiting(server: Server, subject: str = "alice", groups: list[str] | None = None) -> str:
    token = sign_in(server.oidc.url, subject, client_id="vmfarm")["id_token"]
    resp = httpx.post(
        server.url + EX,
        headers={"Authorization": f"Bearer {token}"},
        json={
            "files": {"gate.yaml": gated_pipeline("console", groups=groups or ["release_managers"])}
        },
    )
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def test_a_page_without_a_session_sends_the_browser_to_sign_in(server: Server) -> None:
    resp = httpx.get(server.url + "/console/executions?status=WAITING")
    assert resp.status_code == 303
    assert (
        resp.headers["location"] == "/console/login?next=%2Fconsole%2Fexecutions%3Fstatus%3DWAITING"
    )
    login = httpx.get(server.url + resp.headers["location"])
    assert login.status_code == 303 and login.headers["location"].startswith(server.oidc.url)
    cookie = login.headers["set-cookie"].lower()
    assert "httponly" in cookie and "secure" in cookie and "samesite=lax" in cookie


def test_signing_in_shows_who_you_are_with_a_secure_session_cookie(server: Server) -> None:
    start = httpx.get(server.url + "/console/login")
    bob = console_sign_in(server.url, "bob")
    assert start.status_code == 303
    page = bob.get("/console/signed-out")
    assert "Signed in as <strong>bob</strong>" in page.text
    # no other site may frame the console's buttons
    assert page.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


def test_a_callback_with_a_forged_state_or_no_login_cookie_starts_no_session(
    server: Server,
) -> None:
    start = httpx.get(server.url + "/console/login")
    login_cookie = set_cookie(start, "vmfarm_console_login")
    resp = httpx.get(
        server.url + "/console/callback",
        params={"code": "x", "state": "forged"},
        headers={"Cookie": f"vmfarm_console_login={login_cookie}"},
    )
    assert resp.status_code == 400 and "vmfarm_console=" not in resp.headers.get("set-cookie", "")
    resp = httpx.get(server.url + "/console/callback", params={"code": "x", "state": "x"})
    assert resp.status_code == 400


def test_an_approver_sees_the_message_and_votes_and_approves_with_a_comment(
    server: Server,
) -> None:
    ex_id = _waiting(server)
    erin = console_sign_in(server.url, "erin")
    page = erin.get(f"/console/executions/{ex_id}")
    assert page.status_code == 200
    assert f"Release {ex_id}?" in page.text and "0 of 1" in page.text
    assert 'id="approve-link"' in page.text
    confirm = erin.get(f"/console/executions/{ex_id}/confirm/approve")
    assert confirm.status_code == 200 and 'name="comment"' in confirm.text
    done = erin.post(f"/console/executions/{ex_id}/approve", {"comment": "ship it"})
    assert done.status_code == 303, done.text
    after = erin.get(done.headers["location"])
    assert "SUCCEEDED" in after.text and "approve: " in after.text
    audit = console_sign_in(server.url, "alice").get(f"/console/audit?execution={ex_id}")
    assert "erin" in audit.text and "approved" in audit.text and "ship it" in audit.text


def test_without_the_permission_there_is_no_button_and_a_post_gets_403(server: Server) -> None:
    ex_id = _waiting(server)
    carol = console_sign_in(server.url, "carol")  # pipeline:view only
    page = carol.get(f"/console/executions/{ex_id}")
    assert page.status_code == 200 and "Waiting for approval" in page.text
    assert 'id="approve-link"' not in page.text and "Abort…" not in page.text
    resp = carol.post(f"/console/executions/{ex_id}/approve", {"comment": "me too"})
    assert resp.status_code == 403 and "pipeline:approve" in resp.text
    assert "WAITING" in carol.get(f"/console/executions/{ex_id}").text


def test_a_post_without_the_sessions_csrf_token_changes_nothing(server: Server) -> None:
    ex_id = _waiting(server)
    erin = console_sign_in(server.url, "erin")
    for form in ({}, {"csrf": "guessed"}):
        resp = erin.post(f"/console/executions/{ex_id}/abort", form, csrf=False)
        assert resp.status_code == 403 and "CSRF" in resp.text
    assert "WAITING" in erin.get(f"/console/executions/{ex_id}").text


def test_the_executions_list_filters_by_pipeline_status_and_user(server: Server) -> None:
    ex_id = _waiting(server)
    alice = console_sign_in(server.url, "alice")
    mine = alice.get("/console/executions?pipeline=console&status=WAITING&user=alice&since=1h")
    assert ex_id in mine.text
    assert ex_id not in alice.get("/console/executions?pipeline=console&user=erin").text
    assert ex_id not in alice.get("/console/executions?status=SUCCEEDED").text
    bad = alice.get("/console/executions?status=DONE")
    assert bad.status_code == 422 and "unknown execution status" in bad.text


def test_signing_out_ends_the_session_on_the_server(server: Server) -> None:
    bob = console_sign_in(server.url, "bob")
    assert bob.post("/console/logout").status_code == 303
    assert bob.get("/console/executions").status_code == 303  # back to the sign-in


def test_the_next_approver_sees_the_votes_so_far_with_their_comments(server: Server) -> None:
    token = sign_in(server.oidc.url, "alice", client_id="vmfarm")["id_token"]
    resp = httpx.post(
        server.url + EX,
        headers={"Authorization": f"Bearer {token}"},
        json={
            "files": {"gate.yaml": gated_pipeline("votes", groups=["release_managers"], minimum=2)}
        },
    )
    ex_id = resp.json()["id"]
    erin = console_sign_in(server.url, "erin")
    assert (
        erin.post(f"/console/executions/{ex_id}/approve", {"comment": "tests green"}).status_code
        == 303
    )
    frank = console_sign_in(server.url, "frank")
    page = frank.get(f"/console/executions/{ex_id}/confirm/approve")
    assert "Votes so far: 1 of 2" in page.text
    assert "erin" in page.text and "tests green" in page.text
    again = erin.post(f"/console/executions/{ex_id}/approve", {"comment": "twice"})
    assert again.status_code == 403 and "already approved" in again.text


def test_the_run_form_starts_an_execution_as_the_signed_in_person(server: Server) -> None:
    alice = console_sign_in(server.url, "alice")
    assert 'href="/console/run"' in alice.get("/console/executions").text
    resp = alice.post(
        "/console/run",
        {"files": gated_pipeline("from-form", groups=["release_managers"]), "inputs": ""},
    )
    assert resp.status_code == 303 and resp.headers["location"].startswith(C)
    page = alice.get(resp.headers["location"])
    assert "WAITING" in page.text and "Started by alice" in page.text


def test_the_run_form_says_what_is_wrong_and_keeps_the_text(server: Server) -> None:
    alice = console_sign_in(server.url, "alice")
    broken = gated_pipeline("broken", groups=["ci"]).replace("minimumCount: 1", "minimumCount: [")
    resp = alice.post("/console/run", {"files": broken})
    assert resp.status_code == 422 and "pipeline.yaml:" in resp.text
    assert "minimumCount: [" in resp.text  # the text is still in the form
    local = gated_pipeline("local", groups=["ci"]) + (
        "---\nkind: Infrastructure\nspec:\n  spec:\n    connection:\n"
        "      privateKeyFile: /root/.ssh/id_rsa\n"
    )
    resp = alice.post("/console/run", {"files": local})
    assert resp.status_code == 422 and "privateKeyFile names a path" in resp.text
    resp = alice.post(
        "/console/run", {"files": gated_pipeline("x", groups=["ci"]), "inputs": "oops"}
    )
    assert resp.status_code == 422 and "inputs line 1: NAME=VALUE expected" in resp.text


def test_without_the_permission_to_run_there_is_no_form(server: Server) -> None:
    carol = console_sign_in(server.url, "carol")
    assert 'href="/console/run"' not in carol.get("/console/executions").text
    assert carol.get("/console/run").status_code == 403
    resp = carol.post("/console/run", {"files": gated_pipeline("nope", groups=["ci"])})
    assert resp.status_code == 403 and "pipeline:execute" in resp.text


def test_the_registry_pages_show_each_entry_and_the_diff_between_versions(
    server: Server,
) -> None:
    token = sign_in(server.oidc.url, "alice", client_id="vmfarm")["id_token"]
    name = f"console_{uuid.uuid4().hex[:6]}"
    for kind in ("PreProduction", "Production"):
        resp = httpx.post(
            server.url + "/api/v1/registry",
            headers={"Authorization": f"Bearer {token}"},
            json={
                "files": {
                    "env.yaml": f"apiVersion: v1\nkind: Environment\nmetadata:\n  name: {name}\n"
                    f"spec:\n  type: {kind}\n"
                }
            },
        )
        assert resp.status_code == 200, resp.text
    alice = console_sign_in(server.url, "alice")
    assert 'href="/console/registry"' in alice.get("/console/executions").text
    listing = alice.get("/console/registry")
    assert listing.status_code == 200 and name in listing.text
    page = alice.get(f"/console/registry/environment/{name}")
    assert page.status_code == 200 and "version 2" in page.text
    assert "-  type: PreProduction" in page.text and "+  type: Production" in page.text
    first = alice.get(f"/console/registry/environment/{name}?version=1")
    assert "type: PreProduction" in first.text.split('id="registry-text"')[1].split("</pre>")[0]
    carol = console_sign_in(server.url, "carol")
    assert 'href="/console/registry"' not in carol.get("/console/executions").text
    assert carol.get("/console/registry").status_code == 403
