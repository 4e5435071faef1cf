"""The console in a real browser: a deployer starts a run on the lab hosts that waits for an
approval, an approver signs in in a second browser and approves, and the deployer watches the
hosts move to the new version; a viewer sees no approve button and is refused when it posts
anyway. Every page is kept as a screenshot (tests/browser/artifacts/)."""

from __future__ import annotations

import re
import time
from typing import Any

import httpx
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from tests.browser.conftest import Console, screenshot
from tests.service.conftest import sign_in

VERSION = "2.4.0"
TIMES = "\u00d7"  # how the console writes "version x count"


ENVIRONMENT = """\
apiVersion: v1
kind: Environment
metadata:
  name: lab
  identifier: lab
spec:
  type: PreProduction
"""


def _has_registry(console: Console) -> bool:
    return "/api/v1/registry" in httpx.get(console.url + "/api/openapi.json").json()["paths"]


def _pipeline(console: Console, token: str) -> dict[str, str]:
    """The files a run submits. Where the server has a registry, environments and their
    hosts come only from it: they are applied there first, and the run brings the rest."""
    where = {"env.yaml": ENVIRONMENT, "infra.yaml": console.infrastructure}
    if _has_registry(console):
        resp = httpx.post(
            console.url + "/api/v1/registry",
            headers={"Authorization": f"Bearer {token}"},
            json={"files": where},
            timeout=60,
        )
        assert resp.status_code == 200, resp.text
        where = {}
    pipeline = """\
apiVersion: v1
kind: Service
metadata:
  name: shop
  identifier: shop
spec:
  serviceDefinition:
    type: SSH
    spec:
      artifacts:
        primary:
          type: Http
          spec:
            url: http://127.0.0.1:9/shop-<+artifact.tag>.tar.gz
            tag: <+input>
            allowUnverified: true
---
apiVersion: v1
kind: Pipeline
metadata:
  name: shop-release
  identifier: shop_release
spec:
  stages:
    - stage:
        name: Approve
        identifier: approve
        type: Approval
        spec:
          execution:
            steps:
              - step:
                  type: HarnessApproval
                  name: Approve
                  identifier: approve
                  timeout: 1d
                  spec:
                    approvalMessage: Release shop <+pipeline.executionId> to the lab?
                    approvers:
                      userGroups: [approvers]
                      minimumCount: 1
    - stage:
        name: Deploy
        identifier: deploy
        type: Deployment
        spec:
          service:
            serviceRef: shop
          environment:
            environmentRef: lab
            infrastructureDefinitions:
              - identifier: lab
          strategy:
            type: Rolling
            phases: [2]
          execution:
            steps:
              - step:
                  type: Command
                  name: Install
                  identifier: install
                  spec:
                    commandUnits:
                      - identifier: install
                        type: Script
                        spec:
                          source:
                            type: Inline
                            spec:
                              script: |
                                echo "installing shop <+artifact.tag> on $HOSTADDR"
                                sleep 1
                                mkdir -p /opt/shop
                                echo <+artifact.tag> > /opt/shop/VERSION
                                echo "installed"
"""
    return {"pipeline.yaml": pipeline, **where}


def _sign_in(driver: Any, console: Console, subject: str, path: str) -> None:
    """Open a console page, be sent to the provider, sign in there as ``subject``."""
    driver.get(console.url + path)
    field = WebDriverWait(driver, 20).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, "input[name=sub][type=text]"))
    )
    screenshot(driver, f"sign-in-{subject}")
    field.send_keys(subject)
    driver.find_element(By.XPATH, "//button[normalize-space()='Authorize']").click()
    WebDriverWait(driver, 20).until(ec.presence_of_element_located((By.ID, "who")))
    assert f"Signed in as {subject}" in driver.find_element(By.ID, "who").text


def _text(driver: Any, element_id: str) -> str:
    try:
        return str(driver.find_element(By.ID, element_id).text)
    except Exception:  # replaced by a live update between find and read
        return ""


def test_a_deployer_watches_an_approver_release_to_every_lab_host(
    console: Console, browser: Any
) -> None:
    hosts = len(console.lab.hosts)
    # Given dana (a deployer) signed in, with a run she starts from the console's run form
    dana = browser()
    _sign_in(dana, console, "dana", "/console/executions")
    watcher = browser()  # a second window of hers on the list, which updates by itself
    _sign_in(watcher, console, "dana", "/console/executions")
    dana.find_element(By.LINK_TEXT, "Run").click()
    token = sign_in(console.oidc.url, "dana", client_id="vmfarm")["id_token"]
    files = _pipeline(console, token)
    dana.find_element(By.ID, "files").send_keys("---\n".join(files.values()))
    dana.find_element(By.ID, "inputs").send_keys(f"tag={VERSION}")
    screenshot(dana, "run-form")
    dana.find_element(By.ID, "run-button").click()
    WebDriverWait(dana, 30).until(lambda d: "/console/executions/" in d.current_url)
    ex_id = dana.current_url.rsplit("/", 1)[-1]
    # the list updates by itself: the new run appears without a reload
    WebDriverWait(watcher, 20).until(
        lambda d: ex_id in d.find_element(By.ID, "executions-live").text
    )
    screenshot(watcher, "executions")
    dana.get(f"{console.url}/console/executions/{ex_id}")
    WebDriverWait(dana, 20).until(lambda d: "WAITING" in _text(d, "execution-status"))
    approval = dana.find_element(By.ID, "approval").text
    assert f"Release shop {ex_id} to the lab?" in approval and "0 of 1" in approval
    # a deployer may not approve: no button
    assert not dana.find_elements(By.ID, "approve-link")
    screenshot(dana, "execution-waiting")

    # When ada (an approver) signs in in a second browser and approves with a comment
    ada = browser()
    _sign_in(ada, console, "ada", f"/console/executions/{ex_id}")
    # by keyboard alone: Tab until the approve link has the focus, then Enter
    for _ in range(40):
        ada.switch_to.active_element.send_keys(Keys.TAB)
        if ada.switch_to.active_element.get_attribute("id") == "approve-link":
            break
    assert ada.switch_to.active_element.get_attribute("id") == "approve-link"
    ada.switch_to.active_element.send_keys(Keys.ENTER)
    WebDriverWait(ada, 20).until(ec.presence_of_element_located((By.ID, "comment")))
    assert f"Release shop {ex_id} to the lab?" in ada.find_element(By.ID, "approval").text
    ada.find_element(By.ID, "comment").send_keys("lab is quiet, go")
    screenshot(ada, "confirm-approve")
    ada.find_element(By.ID, "confirm-button").click()
    WebDriverWait(ada, 20).until(lambda d: "approve:" in d.page_source)
    # ada follows the last host's log live (server-sent events) from before it starts
    last = console.lab.hosts[-1].address
    ada.get(f"{console.url}/console/executions/{ex_id}/hosts/{last}")
    assert ada.find_element(By.ID, "log").get_attribute("data-live") == "on"
    assert "installed" not in ada.find_element(By.ID, "log").text

    # Then dana's page follows the hosts until every one is on the new version
    seen: list[str] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        counts = _text(dana, "host-counts")
        if counts and (not seen or seen[-1] != counts):
            seen.append(counts)
            if len(seen) == 2:
                screenshot(dana, "execution-running")
        if _text(dana, "execution-status") in ("SUCCEEDED", "FAILED", "ABORTED"):
            break
        time.sleep(0.2)
    time.sleep(0.5)
    final = _text(dana, "host-counts")
    assert _text(dana, "execution-status") == "SUCCEEDED", dana.page_source[-3000:] + (
        console.server_log()
    )
    screenshot(dana, "execution-succeeded")
    # ada's host page received the log without a reload, and the stream's end
    WebDriverWait(ada, 20).until(lambda d: "ended: SUCCEEDED" in _text(d, "log-state"))
    assert f"installing shop {VERSION} on {last}" in _text(ada, "log")
    screenshot(ada, "host-live-log")
    assert f"{hosts} hosts" in final and f"SUCCEEDED {hosts}" in final, final
    assert f"{VERSION} {TIMES}{hosts}" in final, final
    assert len(seen) >= 2, seen  # the counts changed while she watched
    assert any(f"SUCCEEDED {hosts}" not in s for s in seen), seen

    # any host is one click away: its attempts and its log
    first = dana.find_element(By.CSS_SELECTOR, "#hosts tbody a")
    name = first.text
    first.click()
    WebDriverWait(dana, 20).until(ec.presence_of_element_located((By.ID, "log")))
    log = dana.find_element(By.ID, "log").text
    assert f"installing shop {VERSION}" in log and "installed" in log, log
    assert re.search(r"install\s+1\s+SUCCEEDED\s+0", dana.find_element(By.TAG_NAME, "table").text)
    assert name in dana.title
    screenshot(dana, "host")
    for h in console.lab.hosts:
        assert (h.host_dir / "opt" / "shop" / "VERSION").read_text().strip() == VERSION

    # the fleet and the audit trail show the release and who approved it
    dana.get(console.url + "/console/fleet")
    fleet = dana.find_element(By.TAG_NAME, "main").text
    assert (
        "b-r1@test" in fleet
        and f"shop in lab: {hosts} instance(s); {VERSION} {TIMES}{hosts}" in fleet
    )
    screenshot(dana, "fleet")
    dana.get(f"{console.url}/console/audit?execution={ex_id}")
    audit = dana.find_element(By.ID, "audit").text
    assert re.search(r"ada approve approved", audit) and "lab is quiet, go" in audit, audit
    screenshot(dana, "audit")

    # the registry's pages, where the server has a registry: the lab environment's versions
    if _has_registry(console):
        dana.get(f"{console.url}/console/executions/{ex_id}")
        used = dana.find_element(By.ID, "registry-used").text
        assert "Environment lab v" in used and "Infrastructure lab v" in used, used
        dana.find_element(By.LINK_TEXT, "Registry").click()
        dana.find_element(By.LINK_TEXT, "lab").click()
        assert "type: PreProduction" in dana.find_element(By.ID, "registry-text").text
        screenshot(dana, "registry-entry")

    # dark, when the system is
    dana.execute_cdp_cmd(
        "Emulation.setEmulatedMedia",
        {"features": [{"name": "prefers-color-scheme", "value": "dark"}]},
    )
    dana.get(f"{console.url}/console/executions/{ex_id}")
    background = dana.execute_script("return getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(13, 17, 23)", background
    screenshot(dana, "execution-dark")


def test_a_viewer_sees_no_approve_button_and_is_refused_when_it_posts(
    console: Console, browser: Any
) -> None:
    token = sign_in(console.oidc.url, "dana", client_id="vmfarm")["id_token"]
    files = _pipeline(console, token)
    resp = httpx.post(
        console.url + "/api/v1/executions",
        headers={"Authorization": f"Bearer {token}"},
        json={"files": files, "set": {"tag": "9.9.9"}},
        timeout=60,
    )
    assert resp.status_code == 201, resp.text
    ex_id = resp.json()["id"]
    vic = browser()
    _sign_in(vic, console, "vic", f"/console/executions/{ex_id}")
    WebDriverWait(vic, 20).until(lambda d: "WAITING" in _text(d, "execution-status"))
    assert "Waiting for approval" in vic.find_element(By.ID, "approval").text
    assert not vic.find_elements(By.ID, "approve-link")
    screenshot(vic, "execution-viewer")
    # posting the approval anyway, with the session's own CSRF token: 403
    answer = vic.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        const csrf = document.querySelector("input[name=csrf]").value;
        fetch(arguments[0], {method: "POST", credentials: "same-origin",
              headers: {"Content-Type": "application/x-www-form-urlencoded"},
              body: "csrf=" + encodeURIComponent(csrf) + "&comment=me"})
          .then(r => r.text().then(t => done([r.status, t])));
        """,
        f"/console/executions/{ex_id}/approve",
    )
    assert answer[0] == 403 and "pipeline:approve" in answer[1], answer
    vic.get(f"{console.url}/console/executions/{ex_id}/confirm/approve")
    assert "Not allowed" in vic.page_source
    screenshot(vic, "refused")
    vic.get(f"{console.url}/console/executions/{ex_id}")
    assert "WAITING" in _text(vic, "execution-status")
    # leave nothing waiting behind
    httpx.post(
        f"{console.url}/api/v1/executions/{ex_id}/abort",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
