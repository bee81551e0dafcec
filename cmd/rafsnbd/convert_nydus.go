package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"

	"github.com/urfave/cli/v3"

	"github.com/rafsnbd/rafsnbd/oci"
)

// runConvertNydus is convert --format nydus SRC DST (issue 14 item 3).
func runConvertNydus(ctx context.Context, c *cli.Command) error {
	if c.NArg() != 2 {
		return usagef(c, "--format nydus wants SRC and DST, got %d arguments", c.NArg())
	}
	for _, n := range []string{"export", "verity", "verity-compat"} {
		if c.IsSet(n) {
			return usagef(c, "--%s is for --format tarfs: a nydus image is served lazily, not exported here", n)
		}
	}
	if c.Int("concurrency") < 1 {
		return fmt.Errorf("--concurrency must be at least 1")
	}
	var prefetch []string
	var err error
	if p := c.String("prefetch-files"); p != "" {
		if prefetch, err = readPathList(p); err != nil {
			return err
		}
	}
	stallTimeout := flagDuration(c, "stall-timeout")
	if stallTimeout == 0 {
		stallTimeout = -1
	}
	bars := &convertProgress{}
	defer bars.finish()
	res, err := oci.ConvertNydus(ctx, c.Args().Get(0), c.Args().Get(1), oci.NydusConvertOptions{
		Options: oci.Options{
			CacheDir: c.String("cache-dir"), Concurrency: c.Int("concurrency"), Insecure: c.Bool("insecure"),
			StallTimeout: stallTimeout, Platform: c.String("platform"), Progress: bars.update,
		},
		Compressor:    c.String("compressor"),
		PrefetchFiles: prefetch,
	})
	bars.finish()
	if err != nil {
		return err
	}
	p := res.Published
	logger(ctx).Info().Str("src", res.Source.Ref).Str("dst", p.Ref).Int("blobs", len(p.Layers)-1).Int64("blob_bytes", res.BlobBytes).
		Int64("chunks", res.Chunks).Int64("bootstrap_bytes", res.Bootstrap).Int64("pushed_bytes", p.PushedBytes).
		Dur("build", res.Build).Dur("push", res.Push).Msg("converted to nydus")
	out := c.Root().Writer
	if c.Bool("json") {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(res)
	}
	fmt.Fprintf(out, "image: %s %s\n", p.Ref, p.IndexDigest)
	fmt.Fprintf(out, "manifest: %s\n", p.ManifestDigest)
	fmt.Fprintf(out, "blobs: %d, %d bytes; pushed %d bytes\n", len(p.Layers)-1, res.BlobBytes, p.PushedBytes)
	return nil
}

// readPathList reads one path a line, skipping blank lines and # comments.
func readPathList(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		if !strings.HasPrefix(l, "/") {
			return nil, fmt.Errorf("%s: %q is not an absolute path in the image", path, l)
		}
		out = append(out, l)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return out, nil
}
