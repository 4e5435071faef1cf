"""Notifications from a real run (embedded worker): a failing run sends exactly one failure
message to a local webhook receiver and one email to a local SMTP server (aiosmtpd), with the
execution id, the stage, the failed hosts and the status command to run."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from tests.conftest import base_env, run_vmfarm
from tests.service.conftest import Mailbox, Receiver


def test_a_failing_run_sends_one_webhook_and_one_email(
    receiver: Receiver, mailbox: Mailbox, tmp_path: Path
) -> None:
    (tmp_path / "pipeline.yaml").write_text(
        textwrap.dedent(f"""\
        apiVersion: v1
        kind: Service
        metadata: {{name: web}}
        spec:
          serviceDefinition: {{type: SSH}}
        ---
        apiVersion: v1
        kind: Environment
        metadata: {{name: staging}}
        spec: {{type: PreProduction}}
        ---
        apiVersion: v1
        kind: Infrastructure
        metadata: {{name: fleet, identifier: fleet}}
        spec:
          environmentRef: staging
          type: Pdc
          spec:
            connection: {{type: Local}}
            hosts: [{{hostname: 10.40.0.1}}, {{hostname: 10.40.0.2}}, {{hostname: 10.40.0.3}}]
        ---
        apiVersion: v1
        kind: Pipeline
        metadata: {{name: notified, identifier: notified}}
        spec:
          notificationRules:
            - name: team channel
              events: [PipelineFailed]
              channel: {{type: Slack, spec: {{webhookUrl: "{receiver.url()}"}}}}
            - name: on call
              events: [PipelineFailed]
              channel: {{type: Email, spec: {{to: [oncall@example.com]}}}}
          stages:
            - stage:
                name: Deploy
                identifier: deploy_web
                type: Deployment
                spec:
                  service: {{serviceRef: web}}
                  environment:
                    environmentRef: staging
                    infrastructureDefinitions: [{{identifier: fleet}}]
                  execution:
                    steps:
                      - step:
                          type: Command
                          name: Check
                          identifier: check
                          spec:
                            commandUnits:
                              - identifier: check
                                type: Script
                                spec:
                                  source:
                                    type: Inline
                                    spec:
                                      script: |
                                        if [ <+instance.hostName> = 10.40.0.2 ]; then
                                          echo "port 8080 already in use" >&2; exit 5
                                        fi
        """)
    )
    env = base_env(
        VMFARM_HOME=str(tmp_path / "home"),
        VMFARM_SMTP_HOST="127.0.0.1",
        VMFARM_SMTP_PORT=str(mailbox.port),
        VMFARM_SMTP_FROM="vmfarm@ci.example",
    )
    res = run_vmfarm("run", str(tmp_path / "pipeline.yaml"), "-o", "json", env=env)
    assert res.returncode == 1, res.stdout + res.stderr
    ex_id = json.loads(res.stdout)["id"]

    assert len(receiver.requests) == 1, receiver.requests
    text = json.dumps(receiver.bodies[0])
    assert len(mailbox.messages) == 1
    _, rcpt, mail = mailbox.messages[0]
    assert rcpt == ["oncall@example.com"]
    body = mail.get_body(preferencelist=("plain",))
    assert body is not None
    for message in (text, body.get_content()):
        assert ex_id in message
        assert "deploy_web" in message
        assert "10.40.0.2" in message and "10.40.0.1" not in message
        assert f"vmfarm status {ex_id}" in message
    # asking again for the status sends nothing more
    run_vmfarm("status", ex_id, env=env)
    assert len(receiver.requests) == 1 and len(mailbox.messages) == 1
