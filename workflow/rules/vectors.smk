rule extract_vector:
    """rho_D = theta_QAT(D) - theta_FT(D)."""
    input:
        unpack(job_inputs),
    output:
        **store_outputs("vector"),
        job=store_output("vector", "job"),
    log:
        store_log("vector"),
    params:
        job=lambda wc, output: job_file(wc),  # derived: the key, not the spelling, decides a rerun
        policy=POLICY_ARGS,
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/qvlib.yaml"
    shell:
        "printf '%s\\n' {params.job} > {output.job} && "
        "{QV} extract --qat {input.qat} --ft {input.ft} {params.policy} -o {output.vector} > {log} 2>&1"


rule merge_leave_one_out:
    """A receiver's merged donor: every other task's vector merged with one method. Its inputs never
    include the receiver's own vector (nor its QAT model); adding a task rebuilds these merges and
    their cells, nothing else."""
    input:
        unpack(job_inputs),
    output:
        **store_outputs("merged"),
        job=store_output("merged", "job"),
    log:
        store_log("merged"),
    params:
        job=lambda wc, output: job_file(wc),  # derived: the key, not the spelling, decides a rerun
        vectors=lambda wc, input: " ".join(inputs_named(wc, "vector:")),
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/qvlib.yaml"
    shell:
        "printf '%s\\n' {params.job} > {output.job} && "
        "{QV} merge {params.vectors} --method {wildcards.method} --receiver {wildcards.receiver} -o {output.vector} > {log} 2>&1"
