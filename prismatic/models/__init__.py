"""The VLA-Adapter policy: Prismatic VLM (DINOv2+SigLIP, Qwen2), ActionQuery tokens and the bridge-attention head.

Public entry points (import from the submodules; nothing heavy is imported here):
    configuration_vla  OpenVLAConfig, make_vla_config("real" | "tiny", **overrides)
    modeling_vla       OpenVLAForActionPrediction, VLAOutput, lora_target_modules, apply_lora, merged_vla_state_dict,
                       load_vla_pretrained, unwrap_vla
    sequence_layout    SequenceLayout, build_sequence_layout, llm_attention_kwargs
    action_heads       L1RegressionActionHead;  proprio_projector: ProprioProjector
    processing_vla     PrismaticProcessor;  policy: VLAPolicy, PolicyConfig, PolicyOutput
    loaders            load_policy, load_upstream_policy_folder, load_prismatic_vlm_checkpoint
"""
