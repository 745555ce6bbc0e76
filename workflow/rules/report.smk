REPORT_FILES = [
    "baselines.parquet",
    "transfer.parquet",
    "summary_donor.parquet",
    "summary_receiver.parquet",
    "diagnostics.parquet",
    "cosine.parquet",
    "summary.md",
    "heatmap_gain.png",
    "heatmap_cosine.png",
]


rule tables:
    """Baselines, every transfer cell with its gain, and donor/receiver summaries (Tables 2, 3, 5-7)."""
    input:
        baselines=expand(f"{OUT}/{{{{arch}}}}/baselines/{{task}}.parquet", task=TASKS),
        cells=expand(f"{OUT}/{{{{arch}}}}/transfer/{{receiver}}/{{donor}}.parquet", receiver=TASKS, donor=TASKS),
    output:
        baselines=f"{OUT}/{{arch}}/baselines.parquet",
        transfer=f"{OUT}/{{arch}}/transfer.parquet",
        donor=f"{OUT}/{{arch}}/summary_donor.parquet",
        receiver=f"{OUT}/{{arch}}/summary_receiver.parquet",
    log:
        f"{LOGS}/{{arch}}/tables.log",
    shell:
        "qv tables --baselines {input.baselines} --cells {input.cells} --out-baselines {output.baselines} "
        "--out-transfer {output.transfer} --out-donor {output.donor} --out-receiver {output.receiver} 2> {log}"


rule diagnostics:
    """Relative norms of each FT update and QV (total and per layer type) and the QV cosine matrix."""
    input:
        backbone=backbone_input,
        ft=expand(f"{OUT}/{{{{arch}}}}/checkpoints/{{task}}.ft.safetensors", task=TASKS),
        vectors=expand(f"{OUT}/{{{{arch}}}}/vectors/{{task}}.safetensors", task=TASKS),
    output:
        norms=f"{OUT}/{{arch}}/diagnostics.parquet",
        cosine=f"{OUT}/{{arch}}/cosine.parquet",
    log:
        f"{LOGS}/{{arch}}/diagnostics.log",
    params:
        backbone=backbone_flag,
    shell:
        "qv diagnostics --config {CONFIG} --arch {wildcards.arch} {params.backbone} --ft {input.ft} "
        "--vectors {input.vectors} --out-norms {output.norms} --out-cosine {output.cosine} 2> {log}"


rule figures:
    """Gain heatmaps at lambda = 1 and at the best lambda (the paper's Fig. 2), controls beside them,
    the QV cosine heatmap, and a markdown summary."""
    input:
        baselines=f"{OUT}/{{arch}}/baselines.parquet",
        transfer=f"{OUT}/{{arch}}/transfer.parquet",
        donor=f"{OUT}/{{arch}}/summary_donor.parquet",
        receiver=f"{OUT}/{{arch}}/summary_receiver.parquet",
        norms=f"{OUT}/{{arch}}/diagnostics.parquet",
        cosine=f"{OUT}/{{arch}}/cosine.parquet",
    output:
        gain=report(f"{OUT}/{{arch}}/heatmap_gain.png", category="Figures"),
        cosine=report(f"{OUT}/{{arch}}/heatmap_cosine.png", category="Figures"),
        summary=report(f"{OUT}/{{arch}}/summary.md", category="Summary"),
    log:
        f"{LOGS}/{{arch}}/figures.log",
    shell:
        "qv figures --arch {wildcards.arch} --baselines {input.baselines} --transfer {input.transfer} "
        "--donor {input.donor} --receiver {input.receiver} --norms {input.norms} --cosine {input.cosine} "
        "--out-gain {output.gain} --out-cosine {output.cosine} --out-summary {output.summary} 2> {log}"
