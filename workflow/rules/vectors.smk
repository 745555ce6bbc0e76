rule extract_vector:
    """rho_D = theta_QAT(D) - theta_FT(D)."""
    input:
        qat=f"{RUN}/checkpoints/{{task}}.qat.safetensors",
        ft=f"{RUN}/checkpoints/{{task}}.ft.safetensors",
    output:
        f"{RUN}/vectors/{{task}}.safetensors",
    log:
        f"{RUN_LOGS}/vectors/{{task}}.log",
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../envs/qvlib.yaml"
    shell:
        "{QV} extract --qat {input.qat} --ft {input.ft} -o {output} > {log} 2>&1"
