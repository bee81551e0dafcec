package main

import (
	"context"
	"fmt"
	"os"
	"strings"
	"unicode/utf8"

	"github.com/urfave/cli/v3"

	"github.com/rafsnbd/rafsnbd/internal/gzran"
	"github.com/rafsnbd/rafsnbd/oci"
	"github.com/rafsnbd/rafsnbd/verity"
)

func init() {
	register(func() *cli.Command {
		return &cli.Command{
			Name:      "index",
			Usage:     "index an OCI image for lazy reads and publish the index beside it",
			ArgsUsage: "REF",
			Description: `Reads each layer of the image REF once as a stream (never storing it) and
makes: the layer's tarfs bootstrap and the merged image bootstrap (as convert
does), a checkpoint table per compressed layer (every --span of
uncompressed data, a place decompression can resume: a gzip block boundary
with its 32 KiB window, or a zstd frame start), and the dm-verity tree of the merged image
disk; the root hash is the one 'convert --export image --verity' prints for
the same image. These are published as one small OCI artifact whose subject
is the image manifest: pushed to the image's repository (OCI 1.1 referrers,
or the sha256-<hex> tag where the registry has no referrers API), or
written into the OCI layout for oci:DIR[:TAG]. An image indexed before with
the same --span and --verity-compat is left alone.

gzip, zstd and uncompressed layers can be indexed. A zstd layer must be in
frames (as zstd:chunked writes it): one frame larger than --span is refused,
as it cannot be read without reading all of it.

The index can say what serving the image fetches first: --prefetch-files
FILE names paths of the image, one per line (a directory stands for the
files below it), and --prefetch-trace FILE stores the device ranges a
workload read, as 'serve --record-trace FILE' recorded them. An index with
another list is another index (the newest is used).

  rafsnbd index --insecure 127.0.0.1:5000/app:v1
  rafsnbd index oci:./layout:v1`,
			Flags: []cli.Flag{
				&cli.BoolFlag{Name: "insecure", Usage: "allow plain HTTP to the registry"},
				&cli.StringFlag{Name: "platform", Value: oci.DefaultPlatform(), Usage: "`OS/ARCH[/VARIANT]` to take from a multi-platform image"},
				sizeFlag("span", gzran.DefaultSpan, "uncompressed `SIZE` between checkpoints (gzip) or frame runs (zstd)"),
				&cli.StringFlag{Name: "verity-compat", Value: "standard", Usage: "`MODE` of the tree: standard (veritysetup) or nydus"},
				&cli.StringFlag{Name: "prefetch-files", Usage: "store the paths in `FILE` (one per line) as what serving fetches first"},
				&cli.StringFlag{Name: "prefetch-trace", Usage: "store the device ranges in `FILE` (written by serve --record-trace) as what serving fetches first"},
				jsonFlag(),
			},
			Action: runIndex,
		}
	})
}

func runIndex(ctx context.Context, c *cli.Command) error {
	if c.NArg() != 1 {
		return usagef(c, "want one image reference, got %d arguments", c.NArg())
	}
	span := flagSize(c, "span")
	if span < 64<<10 {
		return usagef(c, "--span %d: want at least 64 KiB", span)
	}
	compat, err := verity.ParseCompat(c.String("verity-compat"))
	if err != nil {
		return usagef(c, "%v", err)
	}
	prefetch := &oci.IndexPrefetch{}
	if path := c.String("prefetch-files"); path != "" {
		if prefetch.Files, err = readPrefetchFiles(path); err != nil {
			return err
		}
	}
	if path := c.String("prefetch-trace"); path != "" {
		if prefetch.Ranges, err = readTrace(path); err != nil {
			return err
		}
	}
	res, err := oci.Index(ctx, c.Args().First(), oci.IndexOptions{
		Platform: c.String("platform"), Insecure: c.Bool("insecure"), Span: span, VerityCompat: compat, Prefetch: prefetch,
	})
	if err != nil {
		return err
	}
	out := c.Root().Writer
	if c.Bool("json") {
		return printJSON(out, res)
	}
	state := "published"
	if res.Reused {
		state = "already indexed"
	}
	fmt.Fprintf(out, "image: %s %s\nindex: %s (%s, %d bytes, %.2f%% of the image's %d compressed bytes)\nroot hash: %s\n",
		res.Ref, res.ManifestDigest, res.ArtifactDigest, state, res.ArtifactSize,
		100*float64(res.ArtifactSize)/float64(max(res.ImageSize, 1)), res.ImageSize, res.RootHash)
	return nil
}

// readPrefetchFiles reads --prefetch-files: paths, one per line; blank
// lines and lines starting with '#' are skipped.
func readPrefetchFiles(path string) ([]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var out []string
	for i, line := range strings.Split(string(b), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if !utf8.ValidString(line) || strings.ContainsRune(line, 0) {
			return nil, fmt.Errorf("%s:%d: not a path", path, i+1)
		}
		out = append(out, line)
	}
	return out, nil
}
