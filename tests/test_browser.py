"""The on-call dashboard in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``) driven by Selenium against the live test server, with real worker
processes, RabbitMQ and an SMTP server behind it. The page renders, the chart carries
what was sent, the Resend button resends, and a view-only user has no buttons and is
refused when posting one anyway.

Skipped, saying why, only when Chromium or its driver is not installed; ``.ci/run``
installs both, so CI runs these tests."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import pytest
from django.urls import reverse

from notifications import notify
from notifications.models import Notification, OutboxMessage
from tests.conftest import notification_kwargs, wait_for
from tests.test_admin import make, staff, state

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
from selenium.webdriver.common.by import By  # noqa: E402

pytestmark = [
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER),
        reason="headless Chromium tests need Debian's chromium and chromium-driver: "
        "apt-get install -y chromium chromium-driver",
    ),
    pytest.mark.django_db(transaction=True),
]

DASHBOARD = "admin:notifications_notification_dashboard"


@pytest.fixture
def browser() -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1200"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def log_in(browser: Any, live_server: Any, username: str, password: str) -> None:
    """Through the admin's login form, as a person does, landing on the dashboard."""
    target = reverse(DASHBOARD) + "?refresh=0"  # no reload in the middle of a check
    browser.get(f"{live_server.url}{reverse('admin:login')}?next={target}")
    browser.find_element(By.ID, "id_username").send_keys(username)
    browser.find_element(By.ID, "id_password").send_keys(password)
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    wait_for(lambda: "On-call dashboard" in browser.title, timeout=20, what=lambda: browser.page_source[:2000])


def tile(browser: Any, label: str) -> int:
    return int(browser.find_element(By.CSS_SELECTOR, f'#counts [data-status="{label}"]').get_attribute("data-count"))


def held_without_a_relay(settings: Any) -> Notification:
    """A held ambiguous notification, written with the relay's wake-up off so that no
    worker publishes its first outbox row meanwhile (make() marks it published)."""
    settings.NOTIFICATIONS_RELAY_ON_COMMIT = False
    try:
        return make("ambiguous", "held", subject="Your password was changed")
    finally:
        settings.NOTIFICATIONS_RELAY_ON_COMMIT = True


def test_the_dashboard_shows_real_deliveries_and_its_resend_button_resends(
    browser: Any, live_server: Any, django_user_model: Any, smtp_server: Any, workers: Any, settings: Any
) -> None:
    held = held_without_a_relay(settings)
    workers.start()
    keys = [notify(**notification_kwargs()).key for _ in range(5)]
    wait_for(lambda: Notification.objects.filter(key__in=keys, status="sent").count() == 5, timeout=60, what="sent")
    assert all(smtp_server.count(key) == 1 for key in keys)

    django_user_model.objects.create_superuser("oncall", "oncall@example.com", "pw-oncall")
    log_in(browser, live_server, "oncall", "pw-oncall")

    # The page renders, with the figures of what just happened.
    assert browser.find_element(By.CSS_SELECTOR, "#counts h2").text == "Notifications by status"
    assert tile(browser, "sent") == 5 and tile(browser, "ambiguous (held)") == 1
    assert browser.find_element(By.ID, "lag-count").get_attribute("data-count") == "5"
    # The chart: sixty bars whose counts add up to the five sent, drawn with a height.
    bars = browser.find_elements(By.CSS_SELECTOR, "#sent-chart rect.bar")
    assert len(bars) == 60
    counts = [int(bar.get_attribute("data-count")) for bar in bars]
    assert sum(counts) == 5 and counts[-1] + counts[-2] == 5  # this minute (or the one before)
    drawn = [bar for bar in bars if int(bar.get_attribute("data-count"))]
    assert drawn and all(bar.rect["height"] > 10 for bar in drawn)
    assert all(bar.rect["height"] == 0 for bar in bars if bar not in drawn)
    assert browser.find_element(By.ID, "sent-chart").get_attribute("data-total") == "5"

    # The held one, and its Resend button: queued again, the worker sends it once.
    row = browser.find_element(By.ID, f"held-{held.pk}")
    assert "Your password was changed" in row.text
    row.find_element(By.CSS_SELECTOR, 'button[value="resend_ambiguous"]').click()
    wait_for(
        # The page source, not an element: the click's navigation may replace the page
        # between finding an element and reading it.
        lambda: "queued for resending" in browser.page_source,
        timeout=20,
        what=lambda: browser.page_source[:3000],
    )
    assert (
        "1 ambiguous notification(s) queued for resending." in browser.find_element(By.CLASS_NAME, "messagelist").text
    )
    assert OutboxMessage.objects.filter(notification=held).count() == 2
    wait_for(lambda: Notification.objects.get(pk=held.pk).status == "sent", timeout=60, what="resent")
    assert smtp_server.count(held.key) == 1
    browser.refresh()
    assert tile(browser, "sent") == 6 and tile(browser, "ambiguous (held)") == 0
    assert "None held." in browser.find_element(By.ID, "held").text


def test_a_view_only_user_sees_the_dashboard_without_buttons_and_cannot_post_them(
    browser: Any, live_server: Any, django_user_model: Any, settings: Any
) -> None:
    held = held_without_a_relay(settings)
    failed = make("failed", "failed")
    user = staff(django_user_model, "viewer", "view_notification")
    user.set_password("pw-viewer")
    user.save()
    log_in(browser, live_server, "viewer", "pw-viewer")

    assert tile(browser, "ambiguous (held)") == 1 and tile(browser, "failed") == 1
    assert len(browser.find_elements(By.CSS_SELECTOR, "#sent-chart rect.bar")) == 60
    row = browser.find_element(By.ID, f"held-{held.pk}")
    assert held.key in row.text
    assert browser.find_elements(By.CSS_SELECTOR, "#dashboard button, #dashboard form") == []
    assert "Deciding needs the permission" in browser.find_element(By.ID, "held").text

    # Posting the buttons' request anyway, with the session and a valid CSRF token.
    statuses = browser.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        const token = document.querySelector('[name=csrfmiddlewaretoken]').value;
        const post = (action, ids) => {
            const body = new FormData();
            body.append('csrfmiddlewaretoken', token);
            body.append('action', action);
            ids.forEach((id) => body.append('_selected_action', id));
            return fetch(window.location.pathname, {method: 'POST', body, redirect: 'manual'}).then((r) => r.status);
        };
        Promise.all([post('resend_ambiguous', [arguments[0]]), post('mark_ambiguous_sent', [arguments[0]]),
                     post('retry_failed', [arguments[1]])]).then(done);
        """,
        held.pk,
        failed.pk,
    )
    assert statuses == [403, 403, 403]
    assert state(held) == ("ambiguous", "held", 1)
    assert state(failed) == ("failed", "failed", 1)
