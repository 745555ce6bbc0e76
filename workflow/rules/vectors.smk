rule extract_vector:
    """rho_D = theta_QAT(D) - theta_FT(D)."""
    input:
        qat=f"{QRUN}/checkpoints/{{task}}.qat.safetensors",
        ft=f"{RUN}/checkpoints/{{task}}.ft.safetensors",
    output:
        f"{QRUN}/vectors/{{task}}.safetensors",
    log:
        f"{QRUN_LOGS}/vectors/{{task}}.log",
    params:
        policy=POLICY_ARGS,
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/qvlib.yaml"
    shell:
        "{QV} extract --qat {input.qat} --ft {input.ft} {params.policy} -o {output} > {log} 2>&1"


rule merge_leave_one_out:
    """A receiver's merged donor: every other task's vector merged with one method. Its inputs never
    include the receiver's own vector (nor its QAT model); adding a task rebuilds these merges and
    their cells, nothing else."""
    input:
        lambda wc: [f"{OUT}/{wc.arch}/seed{wc.seed}/{wc.quant}/vectors/{t}.safetensors" for t in TASKS if t != wc.receiver],
    output:
        f"{QRUN}/vectors/loo/{{receiver}}.{{method}}.safetensors",
    log:
        f"{QRUN_LOGS}/vectors/loo/{{receiver}}.{{method}}.log",
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/qvlib.yaml"
    shell:
        "{QV} merge {input} --method {wildcards.method} --receiver {wildcards.receiver} -o {output} > {log} 2>&1"
