# Per arch: every seed's and quantizer's rows (tables carry `seed` and `quant`) and the quantizer comparison.
REPORT_FILES = [
    "baselines.parquet",
    "transfer.parquet",
    "summary_donor.parquet",
    "summary_receiver.parquet",
    "specific.parquet",
    "summary_specific.parquet",
    "diagnostics.parquet",
    "cosine.parquet",
    "quantizers.parquet",
    "quantizers.md",
]
# Per arch and quantizer ({OUT}/{arch}/{quant}/): the heatmaps and the summary of that quantizer's grid.
FIGURE_FILES = ["summary.md", "heatmap_gain.png", "heatmap_cosine.png"]
# The paper's Tables 1-3 in its layout, per quantizer (qv paper-tables).
PAPER_FILES = {"md": "paper_tables.md", "table1": "paper_table1.parquet", "transfer": "paper_transfer.parquet"}


rule diagnostics:
    """Relative norms of each FT update and QV (total and per layer type) and the QV cosine matrix, per seed."""
    input:
        unpack(job_inputs),
    output:
        **store_outputs("diagnostics"),
        job=store_output("diagnostics", "job"),
    log:
        store_log("diagnostics"),
    params:
        job=lambda wc, output: job_file(wc),  # derived: the key, not the spelling, decides a rerun
        backbone=backbone_flag,
        ft=lambda wc, input: " ".join(inputs_named(wc, "ft:")),
        vectors=lambda wc, input: " ".join(inputs_named(wc, "vector:")),
        merged=lambda wc, input: " ".join(inputs_named(wc, "merged:")),
    conda:
        "../envs/qvlib.yaml"
    shell:
        "printf '%s\\n' {params.job} > {output.job} && "
        "{QV} diagnostics --config {output.job} --arch {wildcards.arch} --seed {wildcards.seed} --quant {wildcards.quant} "
        "{params.backbone} --ft {params.ft} --vectors {params.vectors} --merged {params.merged} "
        "--out-norms {output.norms} --out-cosine {output.cosine} 2> {log}"


rule tables:
    """Every seed's baselines and cells with gains, specific gains over the random controls with
    bootstrap intervals, donor/receiver summaries (Tables 2, 3, 5-7) and the diagnostics."""
    input:
        baselines=lambda wc: jobs_of("baselines", wc.arch, "table"),
        cells=lambda wc: jobs_of("cell", wc.arch, "table"),
        norms=lambda wc: jobs_of("diagnostics", wc.arch, "norms"),
        cosine=lambda wc: jobs_of("diagnostics", wc.arch, "cosine"),
    output:
        baselines=f"{OUT}/{{arch}}/baselines.parquet",
        transfer=f"{OUT}/{{arch}}/transfer.parquet",
        donor=f"{OUT}/{{arch}}/summary_donor.parquet",
        receiver=f"{OUT}/{{arch}}/summary_receiver.parquet",
        specific=f"{OUT}/{{arch}}/specific.parquet",
        summary_specific=f"{OUT}/{{arch}}/summary_specific.parquet",
        norms=f"{OUT}/{{arch}}/diagnostics.parquet",
        cosine=f"{OUT}/{{arch}}/cosine.parquet",
        quantizers=f"{OUT}/{{arch}}/quantizers.parquet",
        quantizers_md=report(f"{OUT}/{{arch}}/quantizers.md", caption="../report/quantizers.rst", category="Tables",
                             subcategory="{arch} all quantizers", labels={"arch": "{arch}", "quantizer": "all", "item": "quantizers.md"}),
    params:
        ties=LAMBDA_TIES,  # a param, so that changing lambda_ties reruns the reports
    log:
        f"{LOGS}/{{arch}}/tables.log",
    conda:
        "../envs/qvlib.yaml"
    shell:
        "{QV} tables --baselines {input.baselines} --cells {input.cells} --norms {input.norms} --cosine {input.cosine} "
        "--out-baselines {output.baselines} --out-transfer {output.transfer} --out-donor {output.donor} "
        "--out-receiver {output.receiver} --out-specific {output.specific} "
        "--out-summary-specific {output.summary_specific} --out-norms {output.norms} --out-cosine {output.cosine} "
        "--out-quantizers {output.quantizers} --out-quantizers-md {output.quantizers_md} --lambda-ties {params.ties} 2> {log}"


rule figures:
    """Per quantizer: gain heatmaps at lambda = 1 and at the best lambda (the paper's Fig. 2), controls
    beside them, the QV cosine heatmap, and a markdown summary with the verdict against random directions."""
    input:
        baselines=f"{OUT}/{{arch}}/baselines.parquet",
        transfer=f"{OUT}/{{arch}}/transfer.parquet",
        summary_specific=f"{OUT}/{{arch}}/summary_specific.parquet",
        norms=f"{OUT}/{{arch}}/diagnostics.parquet",
        cosine=f"{OUT}/{{arch}}/cosine.parquet",
    output:
        gain=report(f"{OUT}/{{arch}}/{{quant}}/heatmap_gain.png", caption="../report/heatmap_gain.rst",
                    category="Figures", subcategory="{arch} {quant}", labels={"arch": "{arch}", "quantizer": "{quant}", "item": "gain heatmap"}),
        cosine=report(f"{OUT}/{{arch}}/{{quant}}/heatmap_cosine.png", caption="../report/heatmap_cosine.rst",
                      category="Figures", subcategory="{arch} {quant}", labels={"arch": "{arch}", "quantizer": "{quant}", "item": "cosine heatmap"}),
        summary=report(f"{OUT}/{{arch}}/{{quant}}/summary.md", caption="../report/summary.rst",
                       category="Tables", subcategory="{arch} {quant}", labels={"arch": "{arch}", "quantizer": "{quant}", "item": "summary.md"}),
    params:
        ties=LAMBDA_TIES,  # a param, so that changing lambda_ties reruns the reports
    log:
        f"{LOGS}/{{arch}}/{{quant}}/figures.log",
    conda:
        "../envs/qvlib.yaml"
    shell:
        "{QV} figures --arch {wildcards.arch} --quant {wildcards.quant} --baselines {input.baselines} --transfer {input.transfer} "
        "--summary-specific {input.summary_specific} --norms {input.norms} --cosine {input.cosine} "
        "--out-gain {output.gain} --out-cosine {output.cosine} --out-summary {output.summary} --lambda-ties {params.ties} 2> {log}"


rule paper_tables:
    """Per quantizer: the paper's Tables 1-3 in its layout (baselines with the QAT model unquantized and
    quantized; donor and receiver statistics at lambda = 1 and at each tuned lambda), markdown and Parquet."""
    input:
        baselines=f"{OUT}/{{arch}}/baselines.parquet",
        transfer=f"{OUT}/{{arch}}/transfer.parquet",
    output:
        md=report(f"{OUT}/{{arch}}/{{quant}}/{PAPER_FILES['md']}", caption="../report/paper_tables.rst", category="Tables",
                  subcategory="{arch} {quant}", labels={"arch": "{arch}", "quantizer": "{quant}", "item": "paper_tables.md"}),
        table1=f"{OUT}/{{arch}}/{{quant}}/{PAPER_FILES['table1']}",
        transfer=f"{OUT}/{{arch}}/{{quant}}/{PAPER_FILES['transfer']}",
    params:
        ties=LAMBDA_TIES,  # a param, so that changing lambda_ties reruns the reports
    log:
        f"{LOGS}/{{arch}}/{{quant}}/paper_tables.log",
    conda:
        "../envs/qvlib.yaml"
    shell:
        "{QV} paper-tables --name '{wildcards.arch} {wildcards.quant}' --quant {wildcards.quant} "
        "--baselines {input.baselines} --transfer {input.transfer} --out-md {output.md} --out-table1 {output.table1} "
        "--out-transfer {output.transfer} --lambda-ties {params.ties} > /dev/null 2> {log}"
