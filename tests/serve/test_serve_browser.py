"""The page in a real headless Chromium against a real `vlmoe serve`: upload, ask, see the
answer, one heatmap per vision MoE FFN with the right colours, words by expert, hover
details, load bars, the side-by-side dense model, and errors shown for bad input."""

from __future__ import annotations

import easy_vqa
import pytest
import torch

from vlmoe.data import decode_image_bytes
from vlmoe.serve.harness import multipart, request

pytest.importorskip("selenium")
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WAIT_S = 20  # an upper bound for explicit waits on DOM conditions, not a sleep
QUESTION = "what color is the shape?"


def _open(browser, server):
    browser.get(server.url)
    _until(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))


def _until(browser, cond):
    return WebDriverWait(browser, WAIT_S).until(cond)


def _ask(browser, question: str) -> str:
    """Type the question, press Ask, wait until the page says done or error; return which."""
    body = browser.find_element(By.TAG_NAME, "body")
    browser.execute_script("document.body.dataset.state = ''")
    box = browser.find_element(By.ID, "question")
    box.clear()
    box.send_keys(question)
    browser.find_element(By.ID, "ask").click()
    return _until(
        browser,
        lambda d: (
            body.get_attribute("data-state") in ("done", "error")
            and body.get_attribute("data-state")
        ),
    )


def _upload(browser, path: str) -> None:
    browser.find_element(By.ID, "file").send_keys(path)
    _until(browser, lambda d: d.find_element(By.ID, "preview").get_attribute("src"))


def test_upload_ask_answer_heatmaps_words_and_hover(browser, server):
    path = easy_vqa.get_test_image_paths()[5]
    _open(browser, server)
    _upload(browser, path)
    assert _ask(browser, QUESTION) == "done"
    _, info = request(server.url + "api/info")
    col = browser.find_element(By.ID, "col-a")
    answer = col.find_element(By.CLASS_NAME, "answer").text
    assert answer in info["models"][0]["answers"]
    vision = [layer for layer in info["models"][0]["layers"] if layer["modality"] == "vision"]
    canvases = col.find_elements(By.CSS_SELECTOR, "canvas.heatmap")
    assert len(canvases) == len(vision) == 1
    _until(browser, lambda d: all(c.get_attribute("data-drawn") == "1" for c in canvases))

    # the same request through the API: what the page must show
    with open(path, "rb") as f:
        data = f.read()
    body, ctype = multipart({"question": QUESTION}, {"image": ("x.png", data, "image/png")})
    res = request(server.url + "api/ask", body, ctype)[1]
    assert answer == res["answer"]
    rec = res["layers"][0]
    # patch 0's corner pixel = the image blended with its top-1 expert's colour at
    # opacity 0.75 × router weight
    rgba = browser.execute_script(
        "return Array.from(arguments[0].getContext('2d').getImageData(2, 2, 1, 1).data)",
        canvases[0],
    )
    image = decode_image_bytes(data, res["image"]["size"])[:, 0, 0].float()
    hex_ = vision[0]["colors"][rec["experts"][0][0]]
    colour = torch.tensor([int(hex_[i : i + 2], 16) for i in (1, 3, 5)]).float()
    a = 0.75 * rec["weights"][0][0]
    expected = image * (1 - a) + colour * a
    assert torch.allclose(torch.tensor(rgba[:3]).float(), expected, atol=3), (rgba, expected)

    words = col.find_elements(By.CSS_SELECTOR, ".words .word")
    assert [w.text for w in words] == res["question"]["tokens"]
    text_rec = res["layers"][1]
    assert [int(w.get_attribute("data-expert")) for w in words] == [
        e[0] for e in text_rec["experts"]
    ]
    tip = browser.find_element(By.ID, "tooltip")
    ActionChains(browser).move_to_element(words[2]).perform()
    _until(browser, lambda d: tip.is_displayed())
    e0, e1 = text_rec["experts"][2]
    assert '"color"' in tip.text and f"expert {e0}:" in tip.text and f"expert {e1}:" in tip.text
    ActionChains(browser).move_to_element_with_offset(canvases[0], -90, -90).perform()
    _until(browser, lambda d: "patch 0 (row 0, col 0)" in tip.text)

    rows = col.find_elements(By.CSS_SELECTOR, '.load[data-name="layer1.vision"] .load-row')
    assert (
        len(rows) == rec["num_experts"]
        and len(rows[0].find_elements(By.CLASS_NAME, "bar-train")) == 1
    )
    dense = browser.find_element(By.ID, "col-b")
    assert dense.find_element(By.CLASS_NAME, "answer").text in info["models"][1]["answers"]
    assert "no MoE layers" in dense.text and not dense.find_elements(By.TAG_NAME, "canvas")


def test_bad_upload_and_empty_question_show_errors_then_the_page_recovers(
    browser, server, tmp_path
):
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    _open(browser, server)
    error = browser.find_element(By.ID, "error")
    browser.find_element(By.ID, "file").send_keys(str(bad))
    assert _ask(browser, QUESTION) == "error"
    assert error.is_displayed() and "'notes.png': cannot decode image" in error.text
    assert not browser.find_elements(By.CSS_SELECTOR, "#col-a canvas")

    browser.find_element(By.CSS_SELECTOR, '[data-example="2"]').click()
    _until(browser, lambda d: d.find_element(By.ID, "question").get_attribute("value"))
    assert _ask(browser, "   ") == "error"
    assert "non-empty question" in error.text

    assert _ask(browser, "is there a circle?") == "done"
    assert not error.is_displayed()
    assert browser.find_elements(By.CSS_SELECTOR, "#col-a canvas.heatmap")


def test_examples_fill_the_question(browser, server):
    _open(browser, server)
    _, examples = request(server.url + "api/examples")
    buttons = browser.find_elements(By.CSS_SELECTOR, ".examples button")
    assert len(buttons) == len(examples)
    buttons[3].click()
    _until(
        browser,
        lambda d: (
            d.find_element(By.ID, "question").get_attribute("value") == examples[3]["question"]
        ),
    )
    assert "selected" in buttons[3].get_attribute("class")
