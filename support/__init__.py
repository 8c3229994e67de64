"""The machinery under the top-level files: nothing here is needed to understand captioning.

    files.py            atomic writes, locks, loading plain-data torch files safely
    processes.py        torchrun processes and stop signals
    run.py              a training run's out dir, checkpoints with RNG states, the JSONL log, its end
    flags.py            the flags train.py and scst.py share, and their checks
    backbones.py        the frozen vision backbones and their weights (EfficientNet-Lite0, CLIP, BLIP)
    images.py           reading an image: from a folder or a zip, orientation, modes, pixel limits
    coco_download.py    fetching COCO's Karpathy split, resumable and verified
    embedding_cache.py  the backbone's image tokens of a split, computed once and memory-mapped
    ptb_tokenizer.py    PTB tokens as the COCO caption evaluation sees them
    cider.py            CIDEr-D with fixed document frequencies, self-critical training's reward
    report.py           the metric table and the gallery page

Nothing here imports a top-level file (captioner, data, evaluate, train, scst).
"""
