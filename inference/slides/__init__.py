"""Reading images: the reader protocol, OpenSlide and direct TIFF tiles, GPU decoding, read-ahead, tissue and stain
detection."""
