"""Model files and networks: manifests, safetensors members, the U-Net, the nuclei FCN, ensembles."""
