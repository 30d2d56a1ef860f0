"""The chat page (`GET /` of `ivl-fast serve`) in a real headless Chromium (Debian's chromium + chromium-driver,
driven by selenium): the page loads and finds the model, a message is sent, the answer streams in, and it is the
greedy answer the decoder gives alone; alpha 0 from the slider gives the base alone's answer. A screenshot is taken
(README's docs/chat_page.png comes from docs/chat_screenshot.py, on the demo's models)."""

from __future__ import annotations

import os
import shutil

import pytest

webdriver = pytest.importorskip("selenium.webdriver")
pytest.importorskip("fastapi")
if not (shutil.which("chromium") and shutil.which("chromedriver")):
    pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from serve_fixtures import Server  # noqa: E402

from ivl_fast import FastIVLDecoder  # noqa: E402


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,700"):
        opts.add_argument(flag)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=opts, service=service)
    yield driver
    driver.quit()


def test_the_page_streams_the_answer_of_the_decoder(pair, browser, tmp_path):
    _, _, base_dir, value_dir = pair
    srv = Server("--base", base_dir, "--value", value_dir, "--served-model-name", "ivl-chat", "--max-model-len", 128)
    try:
        question = "Where does Kalo live?"
        msgs = [{"role": "user", "content": question}]
        want = FastIVLDecoder.from_pretrained(base_dir, value_dir).generate_text(msgs, chat=True, max_new_tokens=24)
        alone = FastIVLDecoder.from_pretrained(base_dir, None, scheme="base")
        want_base = alone.generate_text(msgs, chat=True, max_new_tokens=24)
        assert want != want_base  # so the alpha slider's effect is visible
        b = browser
        b.get(srv.url + "/")
        wait = WebDriverWait(b, 60)
        b.find_element(By.ID, "max-tokens").clear()
        b.find_element(By.ID, "max-tokens").send_keys("24")
        b.find_element(By.ID, "input").send_keys(question)
        b.find_element(By.ID, "send").click()
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".msg.assistant[data-state=done]")))
        assert b.find_element(By.ID, "model").text == "model: ivl-chat"
        answer = b.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
        assert answer.get_attribute("textContent") == want  # the streamed chunks, joined, are the decoder's answer
        assert answer.is_displayed() and answer.get_attribute("data-finish") in ("stop", "length")
        shot = os.environ.get("IVL_CHAT_SCREENSHOT") or str(tmp_path / "chat.png")
        b.save_screenshot(shot)
        assert os.path.getsize(shot) > 0
        # a new conversation with the alpha slider at 0: the base alone answers
        b.find_element(By.ID, "clear").click()
        b.execute_script(
            "const a = document.getElementById('alpha'); a.value = 0; a.dispatchEvent(new Event('input'));"
        )
        assert b.find_element(By.ID, "alpha-out").text == "0.00"
        b.find_element(By.ID, "input").send_keys(question)
        b.find_element(By.ID, "send").click()
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".msg.assistant[data-state=done]")))
        assert b.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].get_attribute("textContent") == want_base
    finally:
        srv.stop()


def test_with_an_api_key_the_page_says_so_and_keeps_the_question(pair, browser):
    """A server with an API key: the page opened without it says the key is needed (not "model: ?"); a question
    sent without it comes back into the input box (nothing typed is lost); with the key it is answered."""
    _, _, base_dir, value_dir = pair
    srv = Server("--base", base_dir, "--value", value_dir, "--served-model-name", "ivl-key", "--max-model-len", 128,
                 "--api-key", "sesame")  # fmt: skip
    try:
        b = browser
        b.get(srv.url + "/")
        wait = WebDriverWait(b, 60)
        wait.until(EC.text_to_be_present_in_element((By.ID, "model"), "model: enter the API key"))
        question = "Where does Kalo live?"
        b.find_element(By.ID, "max-tokens").clear()
        b.find_element(By.ID, "max-tokens").send_keys("6")
        b.find_element(By.ID, "input").send_keys(question)
        b.find_element(By.ID, "send").click()
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".msg.error")))
        assert b.find_element(By.ID, "input").get_attribute("value") == question
        assert not b.find_elements(By.CSS_SELECTOR, ".msg.user")  # no question bubble left without its answer
        b.find_element(By.ID, "api-key").send_keys("sesame")
        b.find_element(By.ID, "input").click()  # leaving the key field: the page reads the model again
        wait.until(EC.text_to_be_present_in_element((By.ID, "model"), "model: ivl-key"))
        b.find_element(By.ID, "send").click()
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".msg.assistant[data-state=done]")))
        assert [e.text for e in b.find_elements(By.CSS_SELECTOR, ".msg.user")] == [question]
        assert b.find_element(By.ID, "input").get_attribute("value") == ""
    finally:
        srv.stop()


def test_compare_shows_the_base_alone_beside_the_steered_answer_with_its_changed_tokens_marked(pair, browser, tmp_path):
    """"Compare with the base alone": two answers side by side, the base alone's (alpha 0) and the steered one, whose
    tokens where the value network changed the choice are marked: the decoders' own answers and components."""
    _, _, base_dir, value_dir = pair
    srv = Server("--base", base_dir, "--value", value_dir, "--served-model-name", "ivl-cmp", "--max-model-len", 128)
    try:
        question = "Where does Kalo live?"
        msgs = [{"role": "user", "content": question}]
        dec = FastIVLDecoder.from_pretrained(base_dir, value_dir)
        tok = dec.tokenizer
        want = dec.generate_text(msgs, chat=True, max_new_tokens=12)
        alone = FastIVLDecoder.from_pretrained(base_dir, None, scheme="base")
        want_base = alone.generate_text(msgs, chat=True, max_new_tokens=12)
        from ivl_fast.chat import render_chat

        ids = tok(render_chat(tok, msgs), add_special_tokens=False)["input_ids"]
        out = dec.generate([ids], max_new_tokens=12, return_components=1)
        n = int(out.num_new_tokens[0])
        new_ids, flags = out.sequences[0, len(ids) : len(ids) + n].tolist(), out.components.changed[0, :n].tolist()
        changed = [tok.decode([i]) for i, c in zip(new_ids, flags, strict=True) if c]
        assert changed  # so the marks are visible
        b = browser
        b.get(srv.url + "/")
        wait = WebDriverWait(b, 60)
        wait.until(EC.text_to_be_present_in_element((By.ID, "model"), "model: ivl-cmp"))
        b.find_element(By.ID, "max-tokens").clear()
        b.find_element(By.ID, "max-tokens").send_keys("12")
        b.find_element(By.ID, "compare").click()
        b.find_element(By.ID, "input").send_keys(question)
        b.find_element(By.ID, "send").click()
        wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, ".msg.assistant[data-state=done]")))
        answer = b.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
        base_col = answer.find_element(By.CSS_SELECTOR, ".base .text").get_attribute("textContent")
        steered = answer.find_element(By.CSS_SELECTOR, ".steered .text")
        assert base_col == want_base
        marks = [m.get_attribute("textContent") for m in steered.find_elements(By.TAG_NAME, "mark")]
        assert marks == changed
        pieces = "".join(s.get_attribute("textContent") for s in steered.find_elements(By.CSS_SELECTOR, "span, mark"))
        assert pieces == "".join(tok.decode([i]) for i in out.sequences[0, len(ids) : len(ids) + n].tolist())
        assert want.startswith(tok.decode(out.sequences[0, len(ids) : len(ids) + n].tolist(), skip_special_tokens=True))
        b.save_screenshot(str(tmp_path / "compare.png"))
    finally:
        srv.stop()
