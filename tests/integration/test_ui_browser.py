"""The local stack's Temporal UI, in a real headless Chromium, decrypts for a signed-in operator.

An operator does what docs/security.md tells them: signs in to the codec server with the stack's
token, then in the UI's Codec Server settings enters the endpoint and turns on "Include
cross-origin credentials". The user's org id (inside the encrypted input of the event that
created the user) must then show on the workflow's page; in a browser without the sign-in the
same page must show ciphertext and no plaintext. Chromium is Debian's (``make test`` installs it);
Playwright drives it with ``executable_path``.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, Response, sync_playwright

from tests.integration.test_cli_stack import (  # noqa: F401 - stack_env is a fixture
    run,
    stack_env,
    stack_settings,
)
from tests.integration.test_cli_ux import start_worker

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

# Without the background-networking flags Chromium floods the closed network with requests.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Generous: a busy 2-core box renders the UI slowly. These are deadlines, never expectations.
WAIT_MS = 120_000
# "binary/encrypted", base64: what the UI shows of a payload it could not decode.
CIPHERTEXT_MARKER = "YmluYXJ5L2VuY3J5cHRlZA=="


def chromium() -> str:
    for candidate in (os.environ.get("SPICESYNC_CHROMIUM"), "chromium", "chromium-browser"):
        path = candidate and shutil.which(candidate)
        if path:
            return path
    pytest.fail("Chromium is not installed: run `make test` (it installs Debian's chromium)")


@pytest.fixture
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=chromium(), headless=True, args=CHROMIUM_FLAGS
        )
        try:
            yield launched
        finally:
            launched.close()


def sign_in(page: Page, codec: str, token: str) -> None:
    """What an operator does once: the codec server's sign-in page sets its session cookie."""
    page.goto(f"{codec}/login")
    page.fill("input[name=token]", token)
    page.click("button[type=submit]")
    page.get_by_text("Signed in").wait_for()


def use_codec_with_credentials(page: Page, ui: str, codec: str) -> None:
    """The UI's Codec Server settings, as an operator fills them in (kept in the browser)."""
    page.goto(f"{ui}/namespaces/default/workflows")
    page.get_by_label("Codec Server is configured").click()
    dialog = page.locator("#data-encoder-settings")
    dialog.get_by_test_id("use-local-endpoint-input").check()
    dialog.locator("textarea").fill(codec)
    dialog.get_by_test_id("data-encoder-include-credentials").click()
    dialog.get_by_role("button", name="Apply").click()
    dialog.wait_for(state="hidden")


def open_the_creation_event(page: Page, ui: str, workflow_id: str) -> list[int]:
    """Open the user's workflow history and expand the event that brought the user in.

    Returns:
        The statuses of the UI's calls to the codec server, filled in as they answer.
    """
    statuses: list[int] = []

    def seen(response: Response) -> None:
        if "/decode" in response.url and response.request.method == "POST":
            statuses.append(response.status)

    page.on("response", seen)
    page.goto(f"{ui}/namespaces/default/workflows/{workflow_id}")
    page.wait_for_url("**/timeline")
    page.goto(page.url.rsplit("/", 1)[0] + "/history")
    # Workflow Execution Update Accepted: its input is the `created` event, org id included.
    page.get_by_text("Update Accepted").first.click()
    page.get_by_text("Accepted Request", exact=True).wait_for()
    return statuses


def test_the_ui_decrypts_for_a_signed_in_operator_only(
    stack_env: dict[str, str],  # noqa: F811 - the fixture imported above
    browser: Browser,
    tmp_path: Path,
) -> None:
    up = run(["stack", "up"], stack_env, timeout=300)
    assert up.returncode == 0, up.stderr
    settings = stack_settings(stack_env)
    ui, codec = settings["TEMPORAL_UI_URL"], settings["SPICESYNC_CODEC_ENDPOINT"]
    org = f"org-browser-{uuid.uuid4().hex[:10]}"
    email = f"browser-{uuid.uuid4().hex[:8]}@example.com"
    worker = start_worker(stack_env, tmp_path / "worker.log")
    try:
        created = run(
            ["users", "create", "--email", email, "--name", "Browser Check", "--org", org],
            stack_env,
        )
    finally:
        worker.stop()
    assert created.returncode == 0, created.stdout + created.stderr
    workflow_id = json.loads(created.stdout)["workflow_id"]

    operator = browser.new_context()
    operator.set_default_timeout(WAIT_MS)
    page = operator.new_page()
    sign_in(page, codec, settings["SPICESYNC_CODEC_TOKEN"])
    use_codec_with_credentials(page, ui, codec)
    statuses = open_the_creation_event(page, ui, workflow_id)
    page.get_by_text(org).first.wait_for()  # decrypted, on the page
    assert email in page.inner_text("body")
    assert statuses and all(status == 200 for status in statuses), statuses
    operator.close()

    stranger = browser.new_context()  # the same UI settings, but never signed in
    stranger.set_default_timeout(WAIT_MS)
    page = stranger.new_page()
    use_codec_with_credentials(page, ui, codec)
    statuses = open_the_creation_event(page, ui, workflow_id)
    page.get_by_text(CIPHERTEXT_MARKER).first.wait_for()  # the UI shows what it could not decode
    text = page.inner_text("body")
    assert org not in text and email not in text
    assert statuses and all(status == 401 for status in statuses), statuses
    stranger.close()
