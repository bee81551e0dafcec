package main

import (
	"bytes"
	"fmt"

	"github.com/rafsnbd/rafsnbd/blockdev"
	"github.com/rafsnbd/rafsnbd/oci"
	"github.com/rafsnbd/rafsnbd/rafs"
)

// openNydusRef composes a nydus image (issue 14): the bootstrap from its
// bootstrap layer, every blob read lazily from the same repository (or
// layout) through the blob cache, which checks each chunk's digest. Its
// error wraps oci.ErrNotNydus when ref is some other image.
func (o *imageOpener) openNydusRef(ref string, withPrefetch bool) (*blockdev.Image, error) {
	c, ctx := o.c, o.ctx
	ni, err := oci.OpenNydus(ctx, ref, oci.OpenNydusOptions{Insecure: c.Bool("insecure")})
	if err != nil {
		return nil, err
	}
	ri, err := rafs.NewImage(bytes.NewReader(ni.Bootstrap), int64(len(ni.Bootstrap)))
	if err != nil {
		return nil, fmt.Errorf("%s: bootstrap layer %s: %w", ref, ni.BootstrapDigest, err)
	}
	if err := o.openCache(); err != nil {
		ri.Close()
		return nil, err
	}
	img, err := blockdev.OpenRafs(ctx, ri, blockdev.CachedBlobs{Cache: o.cache, Store: ni.Store()})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", ref, err)
	}
	img.AddCloser(fetchLog{ref: ni.Ref, stats: ni.FetchStats, log: logger(ctx)})
	// The bootstrap's prefetch table is honoured as for any image read
	// into a --cache-dir (prefetchImage takes it with --prefetch).
	if withPrefetch && c.String("cache-dir") != "" {
		if err := prefetchImage(img, c.Bool("prefetch-all"), c.StringSlice("prefetch")); err != nil {
			img.Close()
			return nil, err
		}
	}
	var blobBytes int64
	for _, b := range ni.Blobs {
		blobBytes += b.Size
	}
	logger(ctx).Info().Str("image", ni.Ref).Str("manifest", ni.ManifestDigest).Str("bootstrap_layer", ni.BootstrapDigest).
		Int("blobs", len(ni.Blobs)).Int64("blob_bytes", blobBytes).Int("prefetch_table", len(ri.PrefetchTable)).
		Int64("size", img.Size()).Msg("nydus image read lazily")
	return img, nil
}
