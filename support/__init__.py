"""The machinery under the top-level files: nothing here is needed to understand captioning.

    files.py            atomic writes, locks, loading plain-data torch files safely
    processes.py        the device (precision, free memory), torchrun processes and stop signals
    run.py              a training run's out dir, checkpoints with RNG states, the JSONL log, its end
    flags.py            the flags train.py and scst.py share, and their checks
    backbones.py        the frozen vision backbones and their weights (EfficientNet-Lite0, CLIP, BLIP)
    images.py           reading an image: from a folder or a zip, orientation, modes, pixel limits
    coco_download.py    fetching COCO's Karpathy split, resumable and verified
    embedding_cache.py  the backbone's image tokens of a split, computed once and memory-mapped
    views.py            augmented views of the training images (crops, mirrors), cached like the plain one
    ema.py              an exponential moving average of the weights (train.py --ema-decay)
    ptb_tokenizer.py    PTB tokens as the COCO caption evaluation sees them
    cider.py            CIDEr-D with fixed document frequencies, self-critical training's reward
    report.py           the metric table and the gallery page
    datasets.py         the dataset layouts (Karpathy's JSON, Hugging Face's imagefolder) and their pitfalls
    caption_files.py    captioning a folder of photos into a file, resumably
    model_folder.py     a model as a folder in the Hugging Face Hub's format, and Hub ids
    serve.py            the --serve page's server (page.html is the page)

Nothing here imports a top-level file (captioner, data, evaluate, train, scst).
"""
