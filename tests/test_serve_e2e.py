"""`llm-modules serve` as a real process on a loopback port: the official `openai` client against it, a
client that disconnects, and the web chat in headless Chromium."""

import os
import shutil
import socket
import subprocess
import sys
import time

import httpx
import pytest

KEY = "e2e-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(models, log, *extra):
    """(process, base URL) of `llm-modules serve` on a free loopback port, once /health says ready."""
    port = free_port()
    cmd = [sys.executable, "-m", "llm_modules.cli", "serve", *(a for n, p in models.items() for a in ("--model", f"{n}={p}")),
           "--port", str(port), "--threads", "1", *extra]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, LLM_MODULES_API_KEY=KEY))
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.terminate()
    pytest.fail("server not ready: " + log.read_text())


@pytest.fixture(scope="module")
def served(served_modules, tmp_path_factory):
    """Base URL of a server with modules alpha (token conditioning) and beta (prompt conditioning)."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    proc, url = start_server({n: served_modules[n] for n in ("alpha", "beta")}, log, "--max-answer-tokens", "240")
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_openai_client_streaming_and_not(served):
    import openai

    client = openai.OpenAI(base_url=served + "/v1", api_key=KEY, max_retries=0)
    assert sorted(m.id for m in client.models.list()) == ["alpha", "beta"]
    msgs = [{"role": "user", "content": "sum of 5 and 5"}]
    for model in ("alpha", "beta"):
        out = client.chat.completions.create(model=model, messages=msgs, temperature=0, max_tokens=10)
        text = out.choices[0].message.content
        assert out.model == model and out.usage.completion_tokens >= 1 and text
        chunks = list(client.chat.completions.create(model=model, messages=msgs, temperature=0, max_tokens=10,
                                                     stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
        assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    done = client.completions.create(model="alpha", prompt="The river", max_tokens=5, temperature=0)
    assert done.choices[0].finish_reason in ("stop", "length") and done.usage.prompt_tokens > 0


def test_openai_client_errors(served):
    import openai

    client = openai.OpenAI(base_url=served + "/v1", api_key=KEY, max_retries=0)
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=msgs)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="alpha", messages=msgs, max_tokens=10_000)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served + "/v1", api_key="wrong", max_retries=0).models.list()


def long_answer_seed(url, messages, model="alpha", n=200):
    """A seed whose sampled answer (temperature 1) runs all n tokens: seeded sampling repeats exactly, so a test
    that stops it early never races an answer that ends by itself."""
    body = {"model": model, "messages": messages, "max_tokens": n, "temperature": 1}
    with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as c:
        return next(s for s in range(40) if c.post(url + "/v1/chat/completions", json=body | {"seed": s})
                    .json()["usage"]["completion_tokens"] == n)


def wait_until_idle(c, url, deadline_s=120.0):
    """/health once no request is generating (polled: no fixed sleep to be too short on a loaded machine)."""
    end = time.monotonic() + deadline_s
    while (health := c.get(url + "/health").json())["requests"] and time.monotonic() < end:
        time.sleep(0.05)
    return health


def test_a_client_that_disconnects_is_never_generated_for(served, served_modules, tmp_path):
    """A server whose idle engine waits for 2 requests before decoding (so no race with a fast engine): a streamed
    request, seeded so that its answer would run all 200 tokens, loses its client while it waits; a second
    request then decodes alone (seeded requests never share a batch) and the first never runs a step."""
    messages = [{"role": "user", "content": "hi"}]
    seed = long_answer_seed(served, messages)  # the same module on the ordinary server
    proc, url = start_server({"alpha": served_modules["alpha"]}, tmp_path / "held.log", "--max-batch", "2",
                             "--batch-window-ms", "600000", "--max-answer-tokens", "240")
    body = {"model": "alpha", "messages": messages, "max_tokens": 200, "temperature": 1}
    try:
        with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as c:
            with c.stream("POST", url + "/v1/chat/completions", json=body | {"seed": seed, "stream": True}) as r:
                first = next(r.iter_lines())  # the role chunk, sent before any token
            assert first.startswith("data: ")
            assert wait_until_idle(c, url)["requests"] == 0  # the server saw the client go
            done = c.post(url + "/v1/chat/completions", json=body | {"seed": seed + 1, "max_tokens": 5}).json()
            health = wait_until_idle(c, url)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert done["usage"]["completion_tokens"] == 5
    assert health["steps"] == 5  # the second request's only: the first, 200 tokens long, never ran


def test_web_chat_in_headless_chromium(served, tmp_path):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "chromium and chromium-driver are missing: README's test command installs them"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,800"):
        opts.add_argument(arg)
    browser = webdriver.Chrome(service=Service(driver), options=opts)
    try:
        browser.get(served + "/")
        wait = WebDriverWait(browser, 180)  # an upper bound for a loaded machine, not a timing window
        browser.find_element(By.ID, "key").send_keys(KEY)
        browser.execute_script("document.getElementById('key').dispatchEvent(new Event('change'))")
        wait.until(lambda b: len(Select(b.find_element(By.ID, "model")).options) == 2)
        browser.find_element(By.ID, "max_tokens").clear()
        browser.find_element(By.ID, "max_tokens").send_keys("12")

        def ask(text):
            n = len(browser.find_elements(By.CSS_SELECTOR, ".assistant"))
            browser.find_element(By.ID, "input").send_keys(text)
            browser.find_element(By.ID, "send").click()
            wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".assistant")) == n + 1
                       and b.find_element(By.ID, "send").is_enabled())
            return browser.find_elements(By.CSS_SELECTOR, ".assistant")[-1]

        first = ask("sum of 5 and 5")
        assert first.find_element(By.CLASS_NAME, "text").text.strip() and "alpha" in first.text
        Select(browser.find_element(By.ID, "model")).select_by_value("beta")
        second = ask("and 2 and 3?")
        assert "beta" in second.text and second.find_element(By.CLASS_NAME, "text").text.strip()
        assert not browser.find_elements(By.CSS_SELECTOR, ".error")
        assert len(browser.find_elements(By.CSS_SELECTOR, ".user")) == 2  # the conversation is kept
        # The stop button ends a long answer early (the server stops generating for the closed stream); a new
        # conversation keeps the prompt short enough for 200 tokens of the tiny model's context.
        browser.find_element(By.ID, "reset").click()
        browser.find_element(By.ID, "max_tokens").clear()
        browser.find_element(By.ID, "max_tokens").send_keys("200")
        browser.find_element(By.ID, "temperature").clear()
        browser.find_element(By.ID, "temperature").send_keys("1")
        # Seeded (the page's seed field), so the sampled answer is one that runs all 200 tokens.
        assert Select(browser.find_element(By.ID, "model")).first_selected_option.get_attribute("value") == "beta"
        seed = long_answer_seed(served, [{"role": "user", "content": "tell me more"}], model="beta")
        browser.find_element(By.ID, "seed").send_keys(str(seed))
        browser.find_element(By.ID, "input").send_keys("tell me more")
        # Click stop from inside the page the moment the first text arrives (a poll from here could come too late).
        browser.execute_script("""
            new MutationObserver((_, obs) => {
                const bubbles = document.querySelectorAll('.assistant .text');
                const last = bubbles[bubbles.length - 1];
                if (last && last.textContent) { obs.disconnect(); document.getElementById('stop').click(); }
            }).observe(document.getElementById('log'), {childList: true, subtree: true, characterData: true});
        """)
        browser.find_element(By.ID, "send").click()
        wait.until(lambda b: b.find_element(By.ID, "send").is_enabled())
        assert browser.find_elements(By.CSS_SELECTOR, ".assistant")[-1].text.endswith("[stopped]")
        browser.save_screenshot(str(tmp_path / "webchat.png"))
        assert (tmp_path / "webchat.png").stat().st_size > 5000
    finally:
        browser.quit()


def test_sigterm_finishes_the_answers_in_flight(served, served_modules, tmp_path):
    """SIGTERM while a long answer streams: the server stops taking connections, finishes that answer to its last
    token and [DONE], then exits (no response is lost). uvicorn re-raises the signal it caught once its shutdown is
    done, so the process reports SIGTERM as its cause of exit; an abrupt death would have cut the stream."""
    messages = [{"role": "user", "content": "hi"}]
    seed = long_answer_seed(served, messages)
    log = tmp_path / "term.log"
    proc, url = start_server({"alpha": served_modules["alpha"]}, log, "--max-answer-tokens", "240")
    body = {"model": "alpha", "messages": messages, "max_tokens": 200, "temperature": 1, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}}
    lines = []
    try:
        with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as c:
            with c.stream("POST", url + "/v1/chat/completions", json=body) as r:
                it = r.iter_lines()
                lines += [next(it), next(it), next(it)]  # the answer has begun
                proc.terminate()
                lines += list(it)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    events = [ln[6:] for ln in lines if ln.startswith("data: ")]
    assert events[-1] == "[DONE]", log.read_text()
    import json

    assert json.loads(events[-2])["usage"]["completion_tokens"] == 200
    assert code in (0, -15), log.read_text()
    assert "length after 200 tokens" in log.read_text()
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=2)
