package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/rs/zerolog"
	"github.com/urfave/cli/v3"

	"github.com/rafsnbd/rafsnbd/blobcache"
	"github.com/rafsnbd/rafsnbd/blobcache/registry"
	"github.com/rafsnbd/rafsnbd/blockdev"
	"github.com/rafsnbd/rafsnbd/oci"
	"github.com/rafsnbd/rafsnbd/rafs"
)

// imageFlags are the flags that name a RAFS image and where its blob bytes
// come from. Every command that composes an image takes them.
func imageFlags() []cli.Flag {
	return append([]cli.Flag{
		&cli.StringFlag{Name: "image", Usage: "an OCI image `REF` converted by 'rafsnbd convert' into --cache-dir (reference, manifest digest, or 12+ hex digits of it), or else read lazily from its registry through the index 'rafsnbd index' published"},
		&cli.StringFlag{Name: "bootstrap", Aliases: []string{"B"}, Usage: "RAFS v6 bootstrap `FILE` (a layer's, or an image's merged one)"},
		&cli.StringFlag{Name: "blob-dir", Aliases: []string{"D"}, Usage: "`DIR` holding the blobs, one file per blob id (for tarfs: the layer tars)"},
		cacheDirFlag(),
	}, blobSourceFlags()...)
}

// imageSource is one image named on the command line: a bootstrap (with
// blobs from -D, --registry or the cache), or a reference to an image
// 'rafsnbd convert' left in --cache-dir.
type imageSource struct {
	bootstrap string
	ref       string
}

// flagSource is the image of a command that composes one.
func flagSource(c *cli.Command) imageSource {
	return imageSource{bootstrap: c.String("bootstrap"), ref: c.String("image")}
}

// identity names the image: a stable identifier (for the kernel's backend
// id, so a restarted server finds its device) and a short name (a default
// export name).
func (s imageSource) identity() (id, short string, err error) {
	if s.ref != "" {
		short = s.ref
		if i := strings.LastIndexAny(short, "/:"); i >= 0 && i < len(short)-1 {
			short = short[i+1:]
		}
		return "rafsnbd:ref:" + s.ref, short, nil
	}
	abs, err := filepath.Abs(s.bootstrap)
	if err != nil {
		return "", "", err
	}
	return "rafsnbd:image:" + abs, strings.TrimSuffix(filepath.Base(abs), filepath.Ext(abs)), nil
}

// multiImageFlags are imageFlags for a command that takes several images:
// -B and --image repeat, and share -D, --registry and --cache-dir.
func multiImageFlags() []cli.Flag {
	flags := imageFlags()
	for i, f := range flags {
		switch f.Names()[0] {
		case "bootstrap":
			flags[i] = &cli.StringSliceFlag{Name: "bootstrap", Aliases: []string{"B"}, Usage: "RAFS v6 bootstrap `FILE` of an image to serve (repeatable)"}
		case "image":
			flags[i] = &cli.StringSliceFlag{Name: "image", Usage: "an OCI image `REF` converted by 'rafsnbd convert' into --cache-dir, or read lazily through its index (repeatable)"}
		}
	}
	return flags
}

// haveImage reports whether the image flags were given.
func haveImage(c *cli.Command) bool { return c.IsSet("bootstrap") || c.IsSet("image") }

// openImage composes the image named by the image flags into a device;
// closing it releases everything it opened.
func openImage(ctx context.Context, c *cli.Command, withPrefetch bool) (*blockdev.Image, error) {
	if c.IsSet("image") && (c.IsSet("bootstrap") || c.IsSet("blob-dir") || c.IsSet("registry") || c.IsSet("backend")) {
		return nil, errors.New("--image names the bootstrap and blobs itself: drop -B, -D, --registry and --backend")
	}
	o := &imageOpener{ctx: ctx, c: c}
	img, err := o.open(flagSource(c), withPrefetch)
	if err != nil {
		o.Close()
		return nil, err
	}
	img.AddCloser(o)
	return img, nil
}

// imageOpener composes images for one command. It opens the command's one
// blob cache (disk-backed under --cache-dir, which is locked per process,
// else memory-only) when the first image needs it, and closes it last.
// Images that share a blob share it through the cache.
type imageOpener struct {
	ctx   context.Context
	c     *cli.Command
	cache *blobcache.Cache
}

// Close closes the blob cache (unlocking it), after the images using it
// are closed.
func (o *imageOpener) Close() error {
	if o.cache == nil {
		return nil
	}
	err := o.cache.Close()
	o.cache = nil
	return err
}

// open composes one image.
//
// Blob bytes always come through the blob cache, which checks every
// chunk's digest before serving it. Without --cache-dir the cache is
// memory-only over -D (chunks decompressed as they are read, a bounded
// number kept). With --cache-dir, blobs come from -D or --registry, are
// fetched lazily and kept across restarts; then withPrefetch starts the
// background prefetch of the bootstrap's prefetch table and of
// --prefetch/--prefetch-all. A converted image (--image) is read from the
// cache's layer tars directly.
func (o *imageOpener) open(src imageSource, withPrefetch bool) (*blockdev.Image, error) {
	c, ctx := o.c, o.ctx
	log := logger(ctx)
	if src.ref != "" {
		return o.openRef(src.ref, withPrefetch)
	}
	boot, cacheRoot := src.bootstrap, c.String("cache-dir")
	if boot == "" {
		return nil, errors.New("no image: give -B BOOTSTRAP (and -D BLOBDIR or --registry REPO), or --image REF")
	}
	dir, repo, err := blobSource(c)
	if err != nil {
		return nil, err
	}
	if repo != "" && cacheRoot == "" {
		return nil, errors.New("--registry reads blobs lazily into a cache: give --cache-dir DIR too")
	}
	if cacheRoot == "" && dir == "" {
		return nil, fmt.Errorf("-B %s needs -D BLOBDIR: the directory holding its blobs", boot)
	}
	ri, err := rafs.Open(boot)
	if err != nil {
		return nil, err
	}
	store, err := openBlobStore(c)
	if err != nil {
		ri.Close()
		return nil, err
	}
	if err := o.openCache(); err != nil {
		ri.Close()
		return nil, err
	}
	img, err := blockdev.OpenRafs(ctx, ri, blockdev.CachedBlobs{Cache: o.cache, Store: store})
	if err != nil {
		return nil, fmt.Errorf("%s: %w", boot, err)
	}
	if withPrefetch && cacheRoot != "" {
		if err := prefetchImage(img, c.Bool("prefetch-all"), c.StringSlice("prefetch")); err != nil {
			img.Close()
			return nil, err
		}
	}
	log.Debug().Str("bootstrap", boot).Int("blobs", len(img.Rafs.Blobs)).Bool("cached", cacheRoot != "").
		Int64("size", img.Size()).Uint32("block_size", img.BlockSize()).Msg("image composed")
	return img, nil
}

// openCache opens the command's blob cache the first time an image needs
// it: disk-backed under --cache-dir, else memory-only.
func (o *imageOpener) openCache() error {
	if o.cache != nil {
		return nil
	}
	var err error
	log := logger(o.ctx)
	if cacheRoot := o.c.String("cache-dir"); cacheRoot == "" {
		o.cache, err = blobcache.OpenMemory(&blobcache.Options{Logger: log})
	} else {
		o.cache, err = openBlobCache(cacheRoot, log)
	}
	return err
}

// rootHashFlag pins the verity root of an image read through its index.
func rootHashFlag() cli.Flag {
	return &cli.StringFlag{Name: "root-hash", Usage: "for --image: read it through its index (even if converted in --cache-dir) and refuse an index whose verity root is not `HEX`"}
}

// openRef composes the image --image names: converted into --cache-dir
// by 'rafsnbd convert', or else (and always with --root-hash) read lazily
// through the index 'rafsnbd index' published beside it: layers fetched
// by range and every unit checked against the image's verity tree before
// it is cached or served.
func (o *imageOpener) openRef(ref string, withPrefetch bool) (*blockdev.Image, error) {
	c, ctx := o.c, o.ctx
	pin := c.String("root-hash")
	if pin == "" && c.String("cache-dir") != "" {
		img, err := openConvertedImage(ctx, c, ref)
		if err == nil {
			return img, nil
		}
		logger(ctx).Debug().Err(err).Str("image", ref).Msg("not converted; looking for its index")
	}
	if pin == "" {
		// A nydus image (issue 14) carries its own bootstrap; any other
		// image is read through its index.
		img, err := o.openNydusRef(ref, withPrefetch)
		if !errors.Is(err, oci.ErrNotNydus) {
			return img, err
		}
	}
	ii, err := oci.OpenIndexed(ctx, ref, oci.OpenIndexOptions{Insecure: c.Bool("insecure"), RootHash: pin, CacheDir: c.String("cache-dir")})
	if err != nil {
		return nil, err
	}
	ri, err := rafs.NewImage(bytes.NewReader(ii.Bootstrap), int64(len(ii.Bootstrap)))
	if err != nil {
		ii.Close()
		return nil, fmt.Errorf("%s: index %s: %w", ref, ii.ArtifactDigest, err)
	}
	if err := o.openCache(); err != nil {
		ri.Close()
		ii.Close()
		return nil, err
	}
	img, err := blockdev.OpenRafs(ctx, ri, blockdev.CachedBlobs{Cache: o.cache, Store: ii.Store()})
	if err != nil {
		ii.Close()
		return nil, fmt.Errorf("%s: index %s: %w", ref, ii.ArtifactDigest, err)
	}
	img.AddCloser(fetchLog{ref: ii.Ref, stats: ii.FetchStats, close: ii.Close, log: logger(ctx)})
	if err := ii.Verity.CheckBootstrap(ctx, img.Composed); err != nil {
		img.Close()
		return nil, fmt.Errorf("%s: index %s: %w", ref, ii.ArtifactDigest, err)
	}
	if withPrefetch && c.String("cache-dir") != "" {
		// The index's list first: each blob's queue is worked in order,
		// so --fetch-all's whole blobs come after it.
		if err := prefetchIndexed(img, ii.Prefetch); err != nil {
			img.Close()
			return nil, fmt.Errorf("%s: index %s: %w", ref, ii.ArtifactDigest, err)
		}
		if err := prefetchImage(img, c.Bool("prefetch-all") || c.Bool("fetch-all"), c.StringSlice("prefetch")); err != nil {
			img.Close()
			return nil, err
		}
	}
	logger(ctx).Info().Str("image", ii.Ref).Str("manifest", ii.ManifestDigest).Str("index", ii.ArtifactDigest).
		Str("root_hash", ii.RootHash).Int("layers", len(ii.Layers)).Int64("size", img.Size()).
		Int64("index_fetched_bytes", ii.ArtifactFetched).Int("prefetch_files", len(ii.Prefetch.Files)).
		Int("prefetch_ranges", len(ii.Prefetch.Ranges)).Msg("image read lazily through its index")
	return img, nil
}

// fetchLog logs, when a lazily read image (indexed or nydus) is closed,
// what it fetched from its registry (scripts/bench-lazy-oci.sh reads this
// line), then closes what reads its layers, if anything needs closing.
type fetchLog struct {
	ref   string
	stats func() registry.Stats
	close func() error // nil: nothing to close
	log   *zerolog.Logger
}

func (f fetchLog) Close() error {
	st := f.stats()
	f.log.Info().Str("image", f.ref).Int64("requests", st.Requests).Int64("retries", st.Retries).
		Int64("fetched_bytes", st.Bytes).Msg("lazy image closed")
	if f.close == nil {
		return nil
	}
	return f.close()
}

// openConvertedImage composes an image that 'rafsnbd convert' left in the
// cache: its merged bootstrap and the layer tars beside it, read directly.
func openConvertedImage(ctx context.Context, c *cli.Command, ref string) (*blockdev.Image, error) {
	cacheRoot := c.String("cache-dir")
	if cacheRoot == "" {
		return nil, errors.New("--image needs --cache-dir DIR: where 'rafsnbd convert' put it")
	}
	boot, dir, err := oci.ResolveImage(cacheRoot, ref)
	if err != nil {
		return nil, err
	}
	img, err := blockdev.Open(ctx, boot, blockdev.LocalBlobs{Dir: dir})
	if err != nil {
		return nil, err
	}
	logger(ctx).Debug().Str("image", ref).Str("bootstrap", boot).Int("layers", len(img.Rafs.Blobs)).
		Int64("size", img.Size()).Msg("converted image composed")
	return img, nil
}

// disk is a flat disk file (an export, any EROFS image) served as it is.
type disk struct {
	*os.File
	size int64
	// blockSize is the EROFS block size when the file starts with an EROFS
	// superblock, else 0.
	blockSize int64
}

func (d *disk) Size() int64 { return d.size }

// openDisk opens a regular file to serve and reads its EROFS block size.
func openDisk(path string) (*disk, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	if !st.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("%s: not a regular file", path)
	}
	blockSize, err := erofsBlockSize(f)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &disk{File: f, size: st.Size(), blockSize: blockSize}, nil
}

// erofsBlockSize reads the block size from an EROFS superblock, or returns 0
// when the file holds none (then the default applies).
func erofsBlockSize(r io.ReaderAt) (int64, error) {
	b := make([]byte, rafs.SuperblockSize)
	if _, err := r.ReadAt(b, rafs.SuperblockOffset); err != nil {
		if errors.Is(err, io.EOF) {
			return 0, nil
		}
		return 0, err
	}
	var sb rafs.Superblock
	sb.Decode(b)
	if sb.Magic != rafs.ErofsMagic {
		return 0, nil
	}
	if sb.BlkSzBits < 9 || sb.BlkSzBits > 16 {
		return 0, fmt.Errorf("EROFS superblock: block size 2^%d is out of range", sb.BlkSzBits)
	}
	return int64(sb.BlockSize()), nil
}
