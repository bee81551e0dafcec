package oci

import (
	"bytes"
	"cmp"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/rafsnbd/rafsnbd/rafs"
	"github.com/rafsnbd/rafsnbd/rafs/build"
)

// NydusConvertOptions control ConvertNydus. The pull (cache, platform,
// registry access) is Convert's.
type NydusConvertOptions struct {
	Options
	// Compressor compresses the chunks: "zstd" (the default, as
	// nydus-image), "lz4_block" or "none".
	Compressor string
	// PrefetchFiles are paths in the image whose inodes fill the merged
	// bootstrap's prefetch table.
	PrefetchFiles []string
}

// NydusConvertResult is what ConvertNydus did.
type NydusConvertResult struct {
	Source    *Result         `json:"source"`
	Published *NydusPublished `json:"published"`
	// BlobBytes and Chunks are the blobs' stored bytes and distinct
	// chunks, over all layers.
	BlobBytes  int64         `json:"blob_bytes"`
	Chunks     int64         `json:"chunks"`
	Build      time.Duration `json:"build_ns"`
	Push       time.Duration `json:"push_ns"`
	Bootstrap  int64         `json:"bootstrap_bytes"`
	LayerBlobs []string      `json:"layer_blobs"` // the new blob id of each layer, "" for none
}

// ConvertNydus converts the image src into a nydus image at dst (a
// registry reference or oci:DIR[:TAG]): the layers are pulled and checked
// as Convert does (into opts.CacheDir), then each layer's tar becomes a
// directory-mode RAFS v6 layer (chunked, compressed, chunks already in a
// lower layer's blob referenced there), the layer bootstraps are merged
// (whiteouts applied) into the image bootstrap, and PublishNydus writes
// the blobs, the bootstrap layer and the config and manifest.
func ConvertNydus(ctx context.Context, src, dst string, opts NydusConvertOptions) (*NydusConvertResult, error) {
	opts.Export = ExportNone
	bopts := build.DefaultOptions("")
	if opts.Compressor != "" {
		c, err := rafs.ParseCompressor(opts.Compressor)
		if err != nil {
			return nil, fmt.Errorf("oci: %w", err)
		}
		bopts.Compressor = c
	}
	res, err := Convert(ctx, src, opts.Options)
	if err != nil {
		return nil, err
	}
	out := &NydusConvertResult{Source: res}
	start := time.Now()
	// The source's config: diff_ids and history are rewritten, the rest
	// (entrypoint, env, platform) is the image's.
	s, err := openSource(ctx, src, sourceOptions{insecure: opts.Insecure, keychain: opts.Keychain, transport: opts.Transport, stall: DefaultStallTimeout})
	if err != nil {
		return nil, err
	}
	platform, err := v1.ParsePlatform(cmp.Or(opts.Platform, DefaultPlatform()))
	if err != nil {
		return nil, fmt.Errorf("oci: platform %q: %w", opts.Platform, err)
	}
	img, err := resolveImage(ctx, s, platform, limits{manifest: DefaultMaxManifestSize, config: DefaultMaxConfigSize, layers: rafs.MaxBlobs})
	if err != nil {
		return nil, err
	}
	if img.manifestDigest.String() != res.ManifestDigest {
		return nil, fmt.Errorf("oci: %s changed during the conversion (manifest %s, then %s)", src, res.ManifestDigest, img.manifestDigest)
	}

	work, err := os.MkdirTemp(opts.CacheDir, "nydus-")
	if err != nil {
		return nil, fmt.Errorf("oci: %w", err)
	}
	defer os.RemoveAll(work)
	bopts.BlobDir = filepath.Join(work, "blobs")
	lb, err := build.NewLayerBuilder(bopts)
	if err != nil {
		return nil, err
	}
	var boots []string
	var blobs []NydusBlobFile
	for i, l := range res.Layers {
		name := fmt.Sprintf("layer %d (%s)", i, l.Digest)
		f, err := os.Open(l.Blob)
		if err != nil {
			return nil, fmt.Errorf("oci: %s: %w", name, err)
		}
		st, err := f.Stat()
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("oci: %s: %w", name, err)
		}
		bootPath := filepath.Join(work, fmt.Sprintf("layer-%d.boot", i))
		bf, err := os.Create(bootPath)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("oci: %w", err)
		}
		br, err := lb.Add(ctx, f, st.Size(), name, bf)
		f.Close()
		if cerr := bf.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("oci: %s: %w", bootPath, cerr)
		}
		if err != nil {
			return nil, err
		}
		boots = append(boots, bootPath)
		id := ""
		for _, b := range br.Blobs {
			blobs = append(blobs, NydusBlobFile{ID: b.ID, Path: b.Path})
			out.BlobBytes += b.Size
			out.Chunks += int64(b.Chunks)
			id = b.ID
		}
		out.LayerBlobs = append(out.LayerBlobs, id)
	}
	var boot bytes.Buffer
	if _, err := build.MergeFiles(ctx, boots, &boot, build.MergeOptions{Prefetch: opts.PrefetchFiles}); err != nil {
		return nil, err
	}
	out.Bootstrap = int64(boot.Len())
	out.Build = time.Since(start)
	start = time.Now()
	out.Published, err = PublishNydus(ctx, dst, img.config, blobs, boot.Bytes(),
		NydusPublishOptions{Insecure: opts.Insecure, Keychain: opts.Keychain, Transport: opts.Transport})
	if err != nil {
		return nil, err
	}
	out.Push = time.Since(start)
	return out, nil
}
