rule cache_splits:
    """A task's test and calib splits, preprocessed once for every seed, evaluation and arch that
    reads them (archs with the same pixels key share the files)."""
    output:
        **store_outputs("cache"),
        job=store_output("cache", "job"),
    log:
        store_log("cache"),
    params:
        job=lambda wc, output: job_file(wc),  # derived: the key, not the spelling, decides a rerun
    threads: threads_of("cache")
    resources:
        **resources_of("cache"),
    conda:
        "../envs/qvlib.yaml"
    shell:
        "printf '%s\\n' {params.job} > {output.job} && "
        "{QV} cache-splits --config {output.job} --task {wildcards.task} --threads {threads} "
        "--test {output.test} --calib {output.calib} 2> {log}"


rule baselines:
    """FT, PTQ(FT), QAT quantized and QAT of one task at one seed (the paper's Tables 1 and 4)."""
    input:
        unpack(job_inputs),
    output:
        **store_outputs("baselines"),
        job=store_output("baselines", "job"),
    log:
        store_log("baselines"),
    params:
        job=lambda wc, output: job_file(wc),  # derived: the key, not the spelling, decides a rerun
    threads: threads_of("evaluate")
    resources:
        **resources_of("evaluate"),
    conda:
        "../envs/qvlib.yaml"
    shell:
        "printf '%s\\n' {params.job} > {output.job} && "
        "{QV} evaluate-baselines --config {output.job} --arch {wildcards.arch} --seed {wildcards.seed} --quant {wildcards.quant} "
        "--task {wildcards.task} --threads {threads} --ft {input.ft} --qat {input.qat} --test-cache {input.test} "
        "--calib-cache {input.calib} -o {output.table} 2> {log}"


rule transfer_cell:
    """One (receiver, donor) cell over the lambda sweep, with its random-direction controls and the
    lambdas the data-free criteria pick; the receiver's own vector (donor == receiver) is the 'self'
    control, donor merged-<method> the receiver's leave-one-out merged donor. One job per cell and
    seed, so adding a task or a seed adds cells instead of recomputing the grid."""
    input:
        unpack(job_inputs),
    output:
        **store_outputs("cell"),
        job=store_output("cell", "job"),
    log:
        store_log("cell"),
    params:
        job=lambda wc, output: job_file(wc),  # derived: the key, not the spelling, decides a rerun
        label=lambda wc: merged_donor(wc.donor.removeprefix(MERGED_PREFIX)) if wc.donor.startswith(MERGED_PREFIX) else wc.donor,
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
        "printf '%s\\n' {params.job} > {output.job} && "
        "{QV} evaluate-transfer --config {output.job} --arch {wildcards.arch} --seed {wildcards.seed} --quant {wildcards.quant} "
        "--receiver {wildcards.receiver} --donor {params.label}={input.vector} --ft {input.ft} "
        "--test-cache {input.test} --calib-cache {input.calib} --threads {threads} -o {output.table} 2> {log}"
