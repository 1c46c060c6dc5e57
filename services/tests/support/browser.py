"""Drives the gateway's live page in headless Chromium (services/tests/http.rs).

Usage: browser.py URL SCREENSHOT.png — opens URL, generates "grinning face" (seed 7, mulo with
block_rows=2, AR beside it), waits until the page is done, saves a screenshot and prints what
the page shows as JSON. Needs selenium and MULO_CHROMEDRIVER (scripts/setup-browser.sh).
"""
import json
import os
import shutil
import sys

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

PAGE_STATE = """
return {
  state: document.body.dataset.state || "",
  error: document.getElementById("error").textContent,
  speedup: document.getElementById("speedup").textContent,
  runs: [...document.querySelectorAll(".run")].map((n) => ({
    method: n.querySelector("h2").textContent,
    state: n.dataset.state,
    blocks: Number(n.dataset.blocks || 0),
    partials: Number(n.dataset.partials || 0),
    final_width: n.querySelector("img.final").naturalWidth,
    tinted: Number(n.querySelector("canvas.map").dataset.tinted),
    stats_rows: n.querySelectorAll("table.stats tr").length,
  })),
};
"""


def fill(driver, element_id, text):
    e = driver.find_element(By.ID, element_id)
    e.clear()
    e.send_keys(text)


def main():
    url, shot = sys.argv[1], sys.argv[2]
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1000,1150"):
        opts.add_argument(a)
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    driver = webdriver.Chrome(service=Service(os.environ["MULO_CHROMEDRIVER"]), options=opts)
    try:
        driver.get(url)
        WebDriverWait(driver, 30).until(
            lambda d: d.find_element(By.ID, "family").text.startswith("Family "))
        fill(driver, "prompt", "grinning face")
        fill(driver, "params", "block_rows=2")
        fill(driver, "seed", "7")
        driver.find_element(By.ID, "sidebyside").click()
        driver.find_element(By.ID, "go").click()
        WebDriverWait(driver, 180).until(
            lambda d: d.execute_script("return document.body.dataset.state") in ("done", "failed"))
        state = driver.execute_script(PAGE_STATE)
        driver.save_screenshot(shot)
        print(json.dumps(state))
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
