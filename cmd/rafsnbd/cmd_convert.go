package main

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"sync"

	"github.com/urfave/cli/v3"

	"github.com/rafsnbd/rafsnbd/oci"
	"github.com/rafsnbd/rafsnbd/verity"
)

func init() {
	register(func() *cli.Command {
		return &cli.Command{
			Name:      "convert",
			Usage:     "pull an OCI/Docker image and convert it to a RAFS v6 tarfs image (nydus-snapshotter's tarfs flow)",
			ArgsUsage: "REF  |  --format nydus SRC DST",
			Description: `Pulls every layer of the image REF whole, checks its digest, decompresses it
(gzip, zstd or none, by media type) into an uncompressed tar whose sha256 must
be the config's diff_id, indexes the tar as a tarfs layer bootstrap (the tar
itself is the blob, 512-byte blocks), and merges the layer bootstraps into
one image bootstrap, applying OCI whiteouts (.wh.NAME, .wh..wh..opq).

REF is a registry reference or an OCI image layout directory:

  rafsnbd convert --cache-dir /var/cache/rafsnbd docker.io/library/alpine:3.20
  rafsnbd convert --cache-dir cache --insecure 127.0.0.1:5000/app:v1
  rafsnbd convert --cache-dir cache oci:./layout:v1     (or oci:DIR@sha256:...)

Credentials come from the Docker config (~/.docker/config.json, credential
helpers). From an index the --platform image is taken (default: linux and
this machine's architecture).

The cache is content addressed; a layer or image converted before is reused,
and a conversion interrupted at any point (even kill -9) is redone by the
next run, never taken as done. Concurrent conversions of the same image wait
for each other. Layout:

  blobs/<diffid>                  layer tars (the tarfs blobs)
  layers/<diffid>.boot            layer bootstraps
  images/<manifest>/image.boot    merged image bootstrap (+ image.json)

--export writes flat EROFS disks beside the tars, named as nydus-snapshotter
names them: 'image' writes blobs/<top layer diffid>.image.disk (merged
bootstrap + every layer tar), 'layer' writes blobs/<diffid>.layer.disk per
layer. Mount one directly:

  rafsnbd convert --cache-dir cache --export image --verity oci:./layout:v1
  mount -t erofs -o loop,ro cache/blobs/<top>.image.disk /mnt

With --verity each disk gets a dm-verity tree (512-byte data blocks, as
nydus) and the 'dm-verity options: ...' line nydus-image prints is printed.
Serve a converted image with 'rafsnbd serve|nbd --image REF --cache-dir DIR'.

--format nydus SRC DST writes a nydus image to DST (a registry reference or
oci:DIR[:TAG]), as nydusify does: each layer becomes a RAFS v6 blob of
chunks (zstd, 1 MiB, chunks already in a lower layer not stored again), the
merged bootstrap is the last layer (image/image.boot in a gzip tar), and an
index entry carries os.feature nydus.remoteimage.v1. Any node then serves
it lazily with 'rafsnbd serve --image DST':

  rafsnbd convert --format nydus --cache-dir cache --insecure \
      127.0.0.1:5000/app:v1 127.0.0.1:5000/app:v1-nydus`,
			Flags: []cli.Flag{
				&cli.StringFlag{Name: "cache-dir", Required: true, Sources: cli.EnvVars("RAFSNBD_CACHE_DIR"), Usage: "`DIR` holding tars, bootstraps and disks (created 0750)"},
				&cli.StringFlag{Name: "export", Value: "none", Usage: "`MODE` of disk export: none, layer or image"},
				&cli.BoolFlag{Name: "verity", Usage: "append a dm-verity tree to exported disks and print its options"},
				&cli.StringFlag{Name: "verity-compat", Value: "standard", Usage: "`MODE` of the tree: standard (veritysetup) or nydus"},
				&cli.IntFlag{Name: "concurrency", Value: oci.DefaultConcurrency, Usage: "layers pulled at once"},
				&cli.BoolFlag{Name: "insecure", Usage: "allow plain HTTP to the registry"},
				durationFlag("stall-timeout", oci.DefaultStallTimeout, "a request that waits `DURATION` for the registry's next bytes is retried (resuming where it stopped), up to 4 times, then fails; 0 waits for ever"),
				&cli.StringFlag{Name: "platform", Value: oci.DefaultPlatform(), Usage: "`OS/ARCH[/VARIANT]` to take from a multi-platform image"},
				&cli.BoolFlag{Name: "json", Usage: "print the result (layers, phase timings in ns, disks) as JSON"},
				&cli.StringFlag{Name: "format", Value: "tarfs", Usage: "`FORMAT` of the result: tarfs (into --cache-dir) or nydus (pushed to DST)"},
				&cli.StringFlag{Name: "prefetch-files", Usage: "with --format nydus: `FILE` listing paths of the image, one a line, for the bootstrap's prefetch table"},
				&cli.StringFlag{Name: "compressor", Value: "zstd", Usage: "with --format nydus: chunk `COMPRESSOR`: zstd, lz4_block or none"},
			},
			Action: runConvert,
		}
	})
}

func runConvert(ctx context.Context, c *cli.Command) error {
	log := logger(ctx)
	switch f := c.String("format"); f {
	case "nydus":
		return runConvertNydus(ctx, c)
	case "tarfs":
	default:
		return usagef(c, "--format %q: want tarfs or nydus", f)
	}
	for _, n := range []string{"prefetch-files", "compressor"} {
		if c.IsSet(n) {
			return usagef(c, "--%s needs --format nydus", n)
		}
	}
	if c.NArg() != 1 {
		return usagef(c, "want one image reference, got %d arguments", c.NArg())
	}
	mode, err := oci.ParseExportMode(c.String("export"))
	if err != nil {
		return err
	}
	compat, err := verity.ParseCompat(c.String("verity-compat"))
	if err != nil {
		return err
	}
	if c.IsSet("verity-compat") && !c.Bool("verity") {
		return fmt.Errorf("--verity-compat needs --verity")
	}
	if c.Bool("verity") && mode == oci.ExportNone {
		return fmt.Errorf("--verity needs --export layer or image: the tree goes into the disk file")
	}
	if c.Int("concurrency") < 1 {
		return fmt.Errorf("--concurrency must be at least 1")
	}

	bars := &convertProgress{}
	defer bars.finish()
	stallTimeout := flagDuration(c, "stall-timeout")
	if stallTimeout == 0 {
		stallTimeout = -1 // the flag's 0 means no limit; Options' means the default
	}
	res, err := oci.Convert(ctx, c.Args().First(), oci.Options{
		CacheDir:     c.String("cache-dir"),
		Export:       mode,
		Verity:       c.Bool("verity"),
		VerityCompat: compat,
		Concurrency:  c.Int("concurrency"),
		Insecure:     c.Bool("insecure"),
		StallTimeout: stallTimeout,
		Platform:     c.String("platform"),
		Progress:     bars.update,
	})
	bars.finish()
	if err != nil {
		return err
	}

	for _, l := range res.Layers {
		ev := log.Info().Int("layer", l.Index).Str("diff_id", l.DiffID).Int64("bytes", l.Size).Int64("tar_bytes", l.TarSize)
		if l.Reused {
			ev.Bool("reused", true).Msg("layer")
			continue
		}
		ev.Dur("download", l.Download).Dur("decompress", l.Decompress).Dur("build", l.Build).Bool("tar_reused", l.TarReused).Msg("layer")
	}
	log.Info().Str("ref", res.Ref).Str("manifest", res.ManifestDigest).Int("layers", len(res.Layers)).
		Bool("reused", res.Reused).Dur("resolve", res.Resolve).Dur("layers_took", res.Layer).Dur("merge", res.Merge).
		Str("bootstrap", res.Bootstrap).Msg("converted")
	for _, ex := range res.Exports {
		log.Info().Str("disk", ex.Path).Str("kind", ex.Kind).Int64("bytes", ex.Size).Bool("reused", ex.Reused).Dur("took", ex.Took).Msg("exported")
	}

	out := c.Root().Writer
	if c.Bool("json") {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(res)
	}
	fmt.Fprintf(out, "image: %s %s\n", res.Ref, res.ManifestDigest)
	fmt.Fprintf(out, "bootstrap: %s\n", res.Bootstrap)
	fmt.Fprintf(out, "blobs: %s\n", res.BlobDir)
	for _, ex := range res.Exports {
		fmt.Fprintf(out, "disk: %s\n", ex.Path)
		if ex.Verity != "" {
			fmt.Fprintln(out, ex.Verity)
		}
	}
	return nil
}

// convertProgress draws one bar for all layer downloads and one per export
// when stderr is a terminal. Events arrive from several goroutines.
type convertProgress struct {
	mu         sync.Mutex
	total      int64
	done       map[int]int64 // downloaded bytes by layer
	reused     map[int]int64 // bytes of layers found in the cache
	pull       *progress
	exportPath string
	export     *progress
}

func (p *convertProgress) update(ev oci.Progress) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch ev.Phase {
	case oci.PhaseResolved:
		p.total, p.done, p.reused = ev.Total, map[int]int64{}, map[int]int64{}
		p.pull = startProgress(ev.Total, "pull")
	case oci.PhaseDownload, oci.PhaseReused:
		if p.pull == nil {
			return
		}
		if ev.Phase == oci.PhaseReused {
			// Not downloaded: off the bar's total, so that it neither
			// jumps nor shows as an absurd rate.
			p.reused[ev.Layer] = ev.Done
			p.pull.SetTotal(p.total - sum(p.reused))
		} else {
			p.done[ev.Layer] = ev.Done
		}
		p.pull.Set(sum(p.done))
	case oci.PhaseExport:
		if ev.Path != p.exportPath {
			if p.export != nil {
				p.export.Finish()
			}
			p.exportPath = ev.Path
			p.export = startProgress(ev.Total, "export "+filepath.Base(ev.Path))
		}
		p.export.Set(ev.Done)
	case oci.PhaseImageDone:
		if p.pull != nil {
			p.pull.Finish()
			p.pull = nil
		}
	}
}

func sum(m map[int]int64) int64 {
	var n int64
	for _, v := range m {
		n += v
	}
	return n
}

func (p *convertProgress) finish() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, bar := range []*progress{p.pull, p.export} {
		if bar != nil {
			bar.Finish()
		}
	}
}
