package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/rs/zerolog"
	"github.com/urfave/cli/v3"

	"github.com/rafsnbd/rafsnbd/blobcache"
	"github.com/rafsnbd/rafsnbd/blobcache/localfs"
	"github.com/rafsnbd/rafsnbd/blobcache/registry"
	"github.com/rafsnbd/rafsnbd/blockdev"
	"github.com/rafsnbd/rafsnbd/rafs"
)

func init() {
	register(func() *cli.Command {
		return &cli.Command{
			Name:  "cache",
			Usage: "list, trim and fill the local blob cache (lazily fetched blob data)",
			Description: `rafsnbd can read blob data lazily, chunk by chunk, from a blob directory
or an OCI registry, and keep what it read in a cache directory that
survives restarts: in DIR/blobcache, per blob a sparse file of its
uncompressed data, a chunk-ready map and the blob's layout. Every chunk is checked against its
digest (blake3 or sha256, from the bootstrap or the blob) before it is
cached; tarfs blobs (plain layer tars) have no digests and are cached as
fetched, in 1 MiB units. One process at a time uses a cache directory (it
is locked with flock).

  rafsnbd cache fetch --cache-dir /var/cache/rafsnbd -B image.boot \
      --registry registry.example.com/library/app --all
  rafsnbd cache ls --cache-dir /var/cache/rafsnbd
  rafsnbd cache gc --cache-dir /var/cache/rafsnbd --max-size 20GiB`,
			Commands: []*cli.Command{
				{
					Name:  "ls",
					Usage: "list cached blobs: size, chunks cached, disk usage, last use",
					Flags: []cli.Flag{
						cacheDirFlag(),
						&cli.BoolFlag{Name: "json", Usage: "print a JSON array instead of a table"},
					},
					Action: runCacheLs,
				},
				{
					Name:  "gc",
					Usage: "remove cached blobs: leftovers always, then by age, size or all",
					Description: `Without options gc only removes leftovers: temporary files of interrupted
writes and blobs whose ready map is unreadable. --older-than removes blobs
not opened for that long; --max-size then removes the least recently used
blobs until the cache takes at most that much disk; --all removes every
blob. The cache must not be in use by another process.`,
					Flags: []cli.Flag{
						cacheDirFlag(),
						&cli.BoolFlag{Name: "all", Usage: "remove every cached blob"},
						durationFlag("older-than", 0, "remove blobs last used longer ago than `DURATION`"),
						sizeFlag("max-size", 0, "then evict least recently used blobs down to `SIZE` on disk"),
					},
					Action: runCacheGC,
				},
				{
					Name:      "fetch",
					Usage:     "fill the cache with an image's data: prefetch table and named files, or --all",
					ArgsUsage: "[PATH...]",
					Description: `Fetches, verifies and caches the data of the files named by PATH (a
directory stands for every file below it) and of the bootstrap's prefetch
table, or of whole blobs with --all (--prefetch-all), so that a later
serve reads nothing from the network; --prefetch PATH adds to the PATH
arguments. Blobs come from -D DIR or --registry REPO. Unlike a serve's
background prefetch, fetch works in the foreground and fails on the first
error.`,
					Flags:  append(imageFlags(), prefetchFlags()...),
					Action: runCacheFetch,
				},
			},
		}
	})
}

func cacheDirFlag() cli.Flag {
	return &cli.StringFlag{Name: "cache-dir", Sources: cli.EnvVars("RAFSNBD_CACHE_DIR"), Usage: "rafsnbd cache `DIR`; blob data lives in DIR/blobcache (created with mode 0750)"}
}

// cacheDir is the blob cache directory: blobcache/ under --cache-dir.
func cacheDir(c *cli.Command) (string, error) {
	dir := c.String("cache-dir")
	if dir == "" {
		return "", errors.New("no cache directory: give --cache-dir DIR (or set RAFSNBD_CACHE_DIR)")
	}
	return filepath.Join(dir, blobCacheSubdir), nil
}

func runCacheLs(ctx context.Context, c *cli.Command) error {
	dir, err := cacheDir(c)
	if err != nil {
		return err
	}
	ents, err := blobcache.List(dir)
	if err != nil {
		return err
	}
	if c.Bool("json") {
		type jsonEntry struct {
			ID         string    `json:"id"`
			Size       int64     `json:"size"`
			Units      int       `json:"units"`
			ReadyUnits int       `json:"ready_units"`
			DiskUsage  int64     `json:"disk_usage"`
			LastUsed   time.Time `json:"last_used"`
			Error      string    `json:"error,omitempty"`
		}
		out := []jsonEntry{}
		for _, e := range ents {
			j := jsonEntry{ID: e.ID, Size: e.Size, Units: e.Units, ReadyUnits: e.ReadyUnits, DiskUsage: e.DiskUsage, LastUsed: e.LastUsed.UTC()}
			if e.Err != nil {
				j.Error = e.Err.Error()
			}
			out = append(out, j)
		}
		enc := json.NewEncoder(c.Root().Writer)
		enc.SetIndent("", "  ")
		return enc.Encode(out)
	}
	return printCacheList(c.Root().Writer, ents)
}

func printCacheList(out io.Writer, ents []blobcache.Entry) error {
	w := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "BLOB\tSIZE\tCACHED\tDISK\tLAST USED")
	var disk int64
	for _, e := range ents {
		disk += e.DiskUsage
		if e.Err != nil {
			fmt.Fprintf(w, "%s\t-\t-\t%s\t%s\t(%v)\n", e.ID, shortBytes(e.DiskUsage), e.LastUsed.Format(time.DateTime), e.Err)
			continue
		}
		pct := 0.0
		if e.Units > 0 {
			pct = 100 * float64(e.ReadyUnits) / float64(e.Units)
		}
		fmt.Fprintf(w, "%s\t%s\t%d/%d chunks (%.0f%%)\t%s\t%s\n", e.ID, shortBytes(e.Size),
			e.ReadyUnits, e.Units, pct, shortBytes(e.DiskUsage), e.LastUsed.Format(time.DateTime))
	}
	fmt.Fprintf(w, "%d blobs\t\t\t%s\t\n", len(ents), shortBytes(disk))
	return w.Flush()
}

// shortBytes prints a byte count in binary units, compactly.
func shortBytes(n int64) string {
	if n < 1024 {
		return fmt.Sprintf("%dB", n)
	}
	v, unit := scaleBytes(uint64(n))
	return fmt.Sprintf("%.1f%s", v, unit)
}

// scaleBytes expresses n (at least 1024) in the largest binary unit, up to
// PiB, that leaves at least 1.
func scaleBytes(n uint64) (float64, string) {
	units := []string{"KiB", "MiB", "GiB", "TiB", "PiB"}
	v, u := float64(n)/1024, 0
	for v >= 1024 && u < len(units)-1 {
		v, u = v/1024, u+1
	}
	return v, units[u]
}

func runCacheGC(ctx context.Context, c *cli.Command) error {
	dir, err := cacheDir(c)
	if err != nil {
		return err
	}
	opts := blobcache.GCOptions{All: c.Bool("all"), OlderThan: flagDuration(c, "older-than")}
	if c.IsSet("max-size") {
		if opts.MaxSize = flagSize(c, "max-size"); opts.MaxSize == 0 {
			return usagef(c, "--max-size 0: use --all to empty the cache")
		}
	}
	cache, err := blobcache.Open(dir, nil)
	if err != nil {
		return err
	}
	defer cache.Close()
	removed, err := cache.GC(opts)
	var freed int64
	for _, e := range removed {
		freed += e.DiskUsage
		fmt.Fprintf(c.Root().Writer, "removed %s (%s)\n", e.ID, shortBytes(e.DiskUsage))
	}
	fmt.Fprintf(c.Root().Writer, "%d blobs removed, %s freed\n", len(removed), shortBytes(freed))
	return err
}

// openBlobStore returns where blob bytes come from: the OCI repository of
// --registry, or the directory of -D.
func openBlobStore(c *cli.Command) (blobcache.Store, error) {
	dir, repo, err := blobSource(c)
	if err != nil {
		return nil, err
	}
	if repo != "" {
		return registry.New(repo, registry.Options{Insecure: c.Bool("insecure")})
	}
	if dir != "" {
		return localfs.New(dir), nil
	}
	return nil, errors.New("no blob source: give -D BLOBDIR or --registry REPO")
}

// blobSource says where blob bytes come from: a directory (-D, or
// --backend localfs:DIR) or an OCI repository (--registry, or --backend
// registry:REPO).
func blobSource(c *cli.Command) (dir, repo string, err error) {
	dir, repo = c.String("blob-dir"), c.String("registry")
	if spec := c.String("backend"); spec != "" {
		if dir != "" || repo != "" {
			return "", "", errors.New("--backend says where blobs are: drop -D and --registry")
		}
		kind, arg, _ := strings.Cut(spec, ":")
		switch {
		case arg == "":
			return "", "", fmt.Errorf("--backend %q: want localfs:DIR or registry:REPO", spec)
		case kind == "localfs":
			dir = arg
		case kind == "registry":
			repo = arg
		default:
			return "", "", fmt.Errorf("--backend %q: unknown backend %q (want localfs or registry)", spec, kind)
		}
	}
	return dir, repo, nil
}

// blobCacheSubdir is where lazily fetched blob data lives under
// --cache-dir, beside convert's blobs/, layers/ and images/, so that one
// cache directory serves every rafsnbd command.
const blobCacheSubdir = "blobcache"

// blobSourceFlags say where blob bytes come from when not from -D: an OCI
// registry, read lazily through the cache (the command also has
// --cache-dir, and -B/-D from imageFlags).
func blobSourceFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "registry", Usage: "read blobs from OCI repository `REPO` (host[:port]/path), blob sha256:<blob id>, through the cache"},
		&cli.StringFlag{Name: "backend", Usage: "where blobs are, as `SPEC` localfs:DIR or registry:REPO (the same as -D DIR or --registry REPO)"},
		&cli.BoolFlag{Name: "insecure", Usage: "allow plain HTTP to the registry"},
	}
}

// prefetchFlags say what to fetch ahead of reads: the bootstrap's prefetch
// table always, plus files by path, or everything.
func prefetchFlags() []cli.Flag {
	return []cli.Flag{
		&cli.BoolFlag{Name: "prefetch-all", Aliases: []string{"all"}, Usage: "fetch every blob whole"},
		&cli.StringSliceFlag{Name: "prefetch", Usage: "fetch the files under `PATH` (repeatable), besides the bootstrap's prefetch table"},
	}
}

// openBlobCache opens (and locks) the blob cache under cacheRoot. One
// process opens it once, however many images it serves.
func openBlobCache(cacheRoot string, log *zerolog.Logger) (*blobcache.Cache, error) {
	return blobcache.Open(filepath.Join(cacheRoot, blobCacheSubdir), &blobcache.Options{Logger: log})
}

// prefetchImage starts background fetching of the bootstrap's prefetch
// table and the files under paths, or of every blob with all.
func prefetchImage(img *blockdev.Image, all bool, paths []string) error {
	handles := make([]*blobcache.Handle, len(img.Blobs))
	for i, b := range img.Blobs {
		handles[i], _ = b.(*blobcache.Handle) // nil: not read through a cache
	}
	if all {
		for _, h := range handles {
			if h != nil {
				h.PrefetchAll()
			}
		}
		return nil
	}
	ranges, err := blobcache.PrefetchRanges(img.Rafs, paths)
	if err != nil {
		return err
	}
	for bi, rs := range ranges {
		if bi < len(handles) && handles[bi] != nil {
			handles[bi].Prefetch(rs...)
		}
	}
	return nil
}

func runCacheFetch(ctx context.Context, c *cli.Command) error {
	log := logger(ctx)
	dir, err := cacheDir(c)
	if err != nil {
		return err
	}
	boot := c.String("bootstrap")
	if boot == "" {
		return errors.New("no image: give -B BOOTSTRAP")
	}
	img, err := rafs.Open(boot)
	if err != nil {
		return err
	}
	defer img.Close()
	store, err := openBlobStore(c)
	if err != nil {
		return err
	}
	ranges := map[int][]blobcache.Range{}
	if c.Bool("prefetch-all") {
		for i := range img.Blobs {
			ranges[i] = []blobcache.Range{{Off: 0, Len: int64(img.Blobs[i].UncompressedSize)}}
		}
	} else if ranges, err = blobcache.PrefetchRanges(img, append(c.Args().Slice(), c.StringSlice("prefetch")...)); err != nil {
		return err
	}
	if len(ranges) == 0 {
		fmt.Fprintln(c.Root().Writer, "nothing to fetch: the image has no prefetch table and no PATH was given (or use --all)")
		return nil
	}
	cache, err := blobcache.Open(dir, &blobcache.Options{Logger: log})
	if err != nil {
		return err
	}
	defer cache.Close()
	var total int64
	for _, rs := range ranges {
		for _, r := range rs {
			total += r.Len
		}
	}
	update, finish := newProgress(total, "fetching")
	defer finish()
	var done int64
	start := time.Now()
	for i := range img.Blobs {
		rs := ranges[i]
		if len(rs) == 0 {
			continue
		}
		e := &img.Blobs[i]
		blob, err := cache.OpenBlob(ctx, store, e, img.ChunkTable)
		if err != nil {
			return err
		}
		for _, r := range rs {
			// Pieces keep the progress bar moving and cancellation prompt.
			for off := r.Off; off < r.Off+r.Len; off += 16 << 20 {
				n := min(16<<20, r.Off+r.Len-off)
				if err := blob.Fetch(ctx, off, n); err != nil {
					blob.Close()
					return err
				}
				done += n
				update(done)
			}
		}
		st := blob.Stats()
		if err := blob.Close(); err != nil {
			return err
		}
		fmt.Fprintf(c.Root().Writer, "blob %s: %d/%d chunks cached (%s), fetched %s in %d requests\n",
			e.ID(), st.ReadyUnits, st.Units, shortBytes(st.ReadyBytes), shortBytes(st.BackendBytes), st.BackendReads)
	}
	finish()
	log.Info().Dur("took", time.Since(start)).Int64("bytes", total).Msg("cache filled")
	return nil
}
