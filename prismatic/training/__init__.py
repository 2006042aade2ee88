"""Training components: fine-tuning loop pieces and CRaFT."""
