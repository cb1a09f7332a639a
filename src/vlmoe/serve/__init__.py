"""`vlmoe serve`: a web page that answers questions about images and shows, for that image and
question, which expert of every MoE layer took each patch and each word.

    inference.py   one question through a checkpoint → answers + routing as a JSON-ready dict
                   (every call into the model is in `run_model`)
    app.py         the FastAPI app: the page and its JSON API (needs the `serve` extra)
    command.py     the `vlmoe serve` command
    examples.py    example images from the easy-VQA package
    static/        index.html, app.js, app.css: plain JavaScript and <canvas>, no CDN
"""
