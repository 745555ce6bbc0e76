rule cache_splits:
    """Each task's test and calib splits, preprocessed once for every seed, evaluation and arch that
    reads them (archs with the same pixels key share the files)."""
    output:
        test=f"{OUT}/{cache_relpath('{pixels}', '{task}', 'test')}",
        calib=f"{OUT}/{cache_relpath('{pixels}', '{task}', 'calib')}",
    log:
        f"{LOGS}/cache/{{pixels}}/{{task}}.log",
    params:
        data_hash=lambda wc: digest(wc.pixels, task_digest(wc.task)),
        arch=lambda wc: pixels_arch(wc.pixels),
    threads: threads_of("cache")
    resources:
        **resources_of("cache"),
    conda:
        "../envs/qvlib.yaml"
    shell:
        "{QV} cache-splits --config {CONFIG} --arch {params.arch} --task {wildcards.task} --threads {threads} "
        "--test {output.test} --calib {output.calib} 2> {log}"


rule baselines:
    """FT, PTQ(FT), QAT quantized and QAT of one task at one seed (the paper's Tables 1 and 4)."""
    input:
        ft=f"{RUN}/checkpoints/{{task}}.ft.safetensors",
        qat=f"{QRUN}/checkpoints/{{task}}.qat.safetensors",
        test=lambda wc: cache_file(wc.arch, wc.task, "test"),
        calib=lambda wc: cache_file(wc.arch, wc.task, "calib"),
    output:
        f"{QRUN}/baselines/{{task}}.parquet",
    log:
        f"{QRUN_LOGS}/baselines/{{task}}.log",
    params:
        eval_hash=lambda wc: digest(quant_json(wc), config.get("evaluate"), config.get("policy")),
    threads: threads_of("evaluate")
    resources:
        **resources_of("evaluate"),
    conda:
        "../envs/qvlib.yaml"
    shell:
        "{QV} evaluate-baselines --config {CONFIG} --arch {wildcards.arch} --seed {wildcards.seed} --quant {wildcards.quant} "
        "--task {wildcards.task} "
        "--threads {threads} --ft {input.ft} --qat {input.qat} --test-cache {input.test} --calib-cache {input.calib} "
        "-o {output} 2> {log}"


rule transfer_cell:
    """One (receiver, donor) cell over the lambda sweep, with its random-direction controls and the
    lambdas the data-free criteria pick; the receiver's own vector (donor == receiver) is the 'self'
    control, donor merged-<method> the receiver's leave-one-out merged donor. One file per cell and
    seed, so adding a task or a seed adds cells instead of recomputing the grid."""
    input:
        ft=f"{RUN}/checkpoints/{{receiver}}.ft.safetensors",
        vector=donor_vector,
        test=lambda wc: cache_file(wc.arch, wc.receiver, "test"),
        calib=lambda wc: cache_file(wc.arch, wc.receiver, "calib"),
    output:
        f"{QRUN}/transfer/{{receiver}}/{{donor}}.parquet",
    log:
        f"{QRUN_LOGS}/transfer/{{receiver}}/{{donor}}.log",
    params:
        eval_hash=lambda wc: digest(quant_json(wc), config.get("lambdas"), config.get("oracle_search"),
                                    config.get("evaluate"), config.get("random_controls"), config.get("policy"),
                                    config.get("datafree"), *optional(config, "lambda_search")),
        label=donor_label,
    threads: threads_of("evaluate")
    resources:
        **resources_of("evaluate"),
    # On a cluster (profiles/slurm), a receiver's row of cells is one submission: the profile's
    # group-components joins every cell of this group name into one group job.
    group:
        ROW_GROUP
    conda:
        "../envs/qvlib.yaml"
    shell:
        "{QV} evaluate-transfer --config {CONFIG} --arch {wildcards.arch} --seed {wildcards.seed} --quant {wildcards.quant} "
        "--receiver {wildcards.receiver} --donor {params.label}={input.vector} --ft {input.ft} "
        "--test-cache {input.test} --calib-cache {input.calib} --threads {threads} -o {output} 2> {log}"
