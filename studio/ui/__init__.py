"""The studio's web UI and API, served by `python app.py` (see `python app.py --help`).

A thin adapter over `Studio`: every tab builds a request from the one request schema
(`studio.requests`) and calls `Studio.run`; nothing here samples, loads or edits images
beyond turning widget values into request fields. Each tab's main function has a stable
`api_name`, so `gradio_client` drives every task:

    from gradio_client import Client, handle_file
    client = Client("http://127.0.0.1:7860/")
    gallery, seed, status = client.predict(prompt="a large red circle", seed=1, api_name="/text_to_image")

Modules, in the order they build on each other: `widgets` (widgets from the request schema and
the checks on what they hand over), `runner` (StudioUI: the studio, the device lock, cancel,
staged inputs, previews), one module per tab (`task_tab`, `batch_tab`, `png_info_tab`,
`models_tab`), and `app` (build_app, launch, main). How the server is exposed (bind address,
auth, upload limit, which files it may read) is `studio/server.py`.
"""

from .app import build_app, launch, main

__all__ = ["build_app", "launch", "main"]
