rule cache_splits:
    """Each task's test and calib splits, preprocessed once for every evaluation that reads them."""
    output:
        test=f"{OUT}/{{arch}}/cache/{{task}}.test.safetensors",
        calib=f"{OUT}/{{arch}}/cache/{{task}}.calib.safetensors",
    log:
        f"{LOGS}/{{arch}}/cache/{{task}}.log",
    params:
        h=lambda wc: digest(config["archs"][wc.arch].get("timm_name"), config["archs"][wc.arch].get("overrides"), task_digest(wc.task)),
    threads: threads_of("cache")
    resources:
        **resources_of("cache"),
    shell:
        "qv cache-splits --config {CONFIG} --arch {wildcards.arch} --task {wildcards.task} --threads {threads} "
        "--test {output.test} --calib {output.calib} 2> {log}"


rule baselines:
    """FT, PTQ(FT), QAT quantized and QAT of one task (the paper's Tables 1 and 4)."""
    input:
        ft=f"{OUT}/{{arch}}/checkpoints/{{task}}.ft.safetensors",
        qat=f"{OUT}/{{arch}}/checkpoints/{{task}}.qat.safetensors",
        test=f"{OUT}/{{arch}}/cache/{{task}}.test.safetensors",
        calib=f"{OUT}/{{arch}}/cache/{{task}}.calib.safetensors",
    output:
        f"{OUT}/{{arch}}/baselines/{{task}}.parquet",
    log:
        f"{LOGS}/{{arch}}/baselines/{{task}}.log",
    params:
        h=lambda wc: digest(config["quant"], config.get("evaluate")),
    threads: threads_of("evaluate")
    resources:
        **resources_of("evaluate"),
    shell:
        "qv evaluate-baselines --config {CONFIG} --arch {wildcards.arch} --task {wildcards.task} --threads {threads} "
        "--ft {input.ft} --qat {input.qat} --test-cache {input.test} --calib-cache {input.calib} -o {output} 2> {log}"


rule transfer_cell:
    """One (receiver, donor) cell over the lambda sweep, with its random-direction control; the
    receiver's own vector (donor == receiver) is the 'self' control. One file per cell, so adding a
    task adds cells instead of recomputing the grid."""
    input:
        ft=f"{OUT}/{{arch}}/checkpoints/{{receiver}}.ft.safetensors",
        vector=f"{OUT}/{{arch}}/vectors/{{donor}}.safetensors",
        test=f"{OUT}/{{arch}}/cache/{{receiver}}.test.safetensors",
        calib=f"{OUT}/{{arch}}/cache/{{receiver}}.calib.safetensors",
    output:
        f"{OUT}/{{arch}}/transfer/{{receiver}}/{{donor}}.parquet",
    log:
        f"{LOGS}/{{arch}}/transfer/{{receiver}}/{{donor}}.log",
    params:
        h=lambda wc: digest(config["quant"], config.get("lambdas"), config.get("oracle_search", True), config.get("evaluate")),
    threads: threads_of("evaluate")
    resources:
        **resources_of("evaluate"),
    shell:
        "qv evaluate-transfer --config {CONFIG} --arch {wildcards.arch} --receiver {wildcards.receiver} "
        "--donor {wildcards.donor}={input.vector} --ft {input.ft} --test-cache {input.test} "
        "--calib-cache {input.calib} --threads {threads} -o {output} 2> {log}"
