"""README's screenshots of the chat page: `ivl-fast serve` on the demo's large base + value network (a full
`ivl-fast demo` work dir) in headless Chromium: two questions (docs/chat_page.png), and with "Compare with the base
alone" on, the base alone's answer beside the steered one with the tokens the value network changed marked
(the second path, default docs/chat_compare.png).

    python docs/chat_screenshot.py /path/to/ivl-demo docs/chat_page.png [docs/chat_compare.png]
"""

import shutil
import sys
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from serve_fixtures import Server  # noqa: E402


def main(work: str, out: str, compare_out: str = "docs/chat_compare.png") -> None:
    from ivl_fast.demo import DemoConfig, make_world

    world = make_world(DemoConfig().n_people, 0)
    person = world["demo_people"][0]  # one the value network was trained on: the format shows
    srv = Server("--base", f"{work}/large", "--value", f"{work}/value", "--served-model-name", "demo-large+value")
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,520"):
        opts.add_argument(flag)
    b = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")))
    try:
        b.get(srv.url + "/")
        b.find_element(By.ID, "max-tokens").clear()
        b.find_element(By.ID, "max-tokens").send_keys("16")
        for q in (f"Where does {person} live?", f"What color does {person} like?"):
            b.find_element(By.ID, "input").send_keys(q)
            b.find_element(By.ID, "send").click()
            WebDriverWait(b, 60).until(
                lambda d, n=q: (
                    len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-state=done]"))
                    == (1 if "live" in n else 2)
                )
            )
        b.save_screenshot(out)
        b.get(srv.url + "/")  # a fresh page: one compared question
        b.find_element(By.ID, "max-tokens").clear()
        b.find_element(By.ID, "max-tokens").send_keys("16")
        b.find_element(By.ID, "compare").click()
        b.find_element(By.ID, "input").send_keys(f"Where does {person} live?")
        b.find_element(By.ID, "send").click()
        WebDriverWait(b, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-state=done]"))
        b.save_screenshot(compare_out)
    finally:
        b.quit()
        srv.stop()


if __name__ == "__main__":
    main(*sys.argv[1:4])
