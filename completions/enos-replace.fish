function __fish_enos-replace_print_command
    set -l cmdline (commandline -poc)
    set -l cmd
    set -e cmdline[1]
    for arg in $cmdline
        switch $arg
            case device
                set cmd $cmd device
                break
            case batch
                set cmd $cmd batch
                break
            case watch
                set cmd $cmd watch
                break
            case audit
                set cmd $cmd audit
                break
            case get
                set cmd $cmd get
                break
            case config
                set cmd $cmd config
                break
            case help
                set cmd $cmd help
                break
            case completion
                set cmd $cmd completion
                break
        end
    end
    echo "$cmd"
end

function __fish_enos-replace_using_command
    test (__fish_enos-replace_print_command) = "$argv"
    and return 0
    or return 1
end

function __fish_enos-replace_seen_command
    string match -q "$argv*" (__fish_enos-replace_print_command)
    and return 0
    or return 1
end

complete -c enos-replace -n '__fish_enos-replace_using_command' -xa 'device' -d 'Replace a device\'s key: the new hardware gets the asset, its data and a new secret'
complete -c enos-replace -n '__fish_enos-replace_using_command' -xa 'batch' -d 'Replace many devices from a plan (CSV or JSON Lines), concurrently and resumably'
complete -c enos-replace -n '__fish_enos-replace_using_command' -xa 'watch' -d 'Watch replaced devices come online: a batch\'s journal or results file, or a plan'
complete -c enos-replace -n '__fish_enos-replace_using_command' -xa 'audit' -d 'List the devices replaced but not online since, with their age: from batch journals and, with --platform, from the platform\'s devices tagged replacedAt (--stamp)'
complete -c enos-replace -n '__fish_enos-replace_using_command' -xa 'get' -d 'Show a device (and, with --secret, its current deviceSecret)'
complete -c enos-replace -n '__fish_enos-replace_using_command' -xa 'config' -d 'Show the resolved configuration and the source of each value (secrets masked)'
complete -c enos-replace -n '__fish_enos-replace_using_command' -xa 'help' -d 'Show the help of enos-replace or of one command (`enos-replace help batch`)'
complete -c enos-replace -n '__fish_enos-replace_using_command' -xa 'completion' -d 'Print a shell completion script: bash, zsh or fish'
complete -c enos-replace -s h -l help -d 'Show this help and exit'
complete -c enos-replace -l version -d 'Print the version and exit'

complete -c enos-replace -n '__fish_enos-replace_seen_command device' -s h -l help -d 'Show this help and exit'
complete -c enos-replace -n '__fish_enos-replace_seen_command device' -l asset-id -r -d 'The device\'s assetId'
complete -c enos-replace -n '__fish_enos-replace_seen_command device' -l product-key -r -d 'The device\'s productKey (with --device-key)'
complete -c enos-replace -n '__fish_enos-replace_seen_command device' -l device-key -r -d 'The device\'s current deviceKey (with --product-key)'
complete -c enos-replace -n '__fish_enos-replace_seen_command device' -l new-key -r -d 'The new hardware\'s deviceKey (4-64 of A-Z a-z 0-9 - _ .)'
complete -c enos-replace -n '__fish_enos-replace_seen_command device' -l no-secret -d 'Do not request the new deviceSecret (the device will need dynamic activation)'
complete -c enos-replace -n '__fish_enos-replace_seen_command device' -l out -r -d 'Write the provisioning record (with the secret) to this new file, mode 0600'
complete -c enos-replace -n '__fish_enos-replace_seen_command device' -l format -xa 'json env text' -d 'Record format: json (default), env or text'
complete -c enos-replace -n '__fish_enos-replace_seen_command device' -l overwrite -d 'Allow --out to replace an existing file'
complete -c enos-replace -n '__fish_enos-replace_seen_command device' -l wait-active -r -d 'Then wait up to this many seconds for the new hardware to come online'
complete -c enos-replace -n '__fish_enos-replace_seen_command device' -l dry-run -d 'Run the preflight and show the signed requests; change nothing'
complete -c enos-replace -n '__fish_enos-replace_seen_command device' -s y -l yes -d 'Do not ask for confirmation'
complete -c enos-replace -n '__fish_enos-replace_seen_command device' -l skip-free-check -d 'Do not search that the new key is free before replacing'
complete -c enos-replace -n '__fish_enos-replace_seen_command device' -l max-attempts -r -d 'Replace attempts in all when the outcome is unknown (default 3)'
complete -c enos-replace -n '__fish_enos-replace_seen_command device' -l max-retry-after -r -d 'The longest Retry-After (s) honoured when throttled (default 300)'
complete -c enos-replace -n '__fish_enos-replace_seen_command device' -l finish -d 'The device was replaced before (it has the new key): do what is left (secret, certificate, gateway link, tags) without replacing again; refused when the device does not have the new key'
complete -c enos-replace -n '__fish_enos-replace_seen_command device' -l no-gateway-check -d 'Do not ask for the device\'s gateway (a sub-device\'s link is then not checked)'
complete -c enos-replace -n '__fish_enos-replace_seen_command device' -l csr -r -d 'The new unit\'s certificate signing request (PEM): after the replace, the old unit\'s certificates are revoked and one is issued for it, into --out'
complete -c enos-replace -n '__fish_enos-replace_seen_command device' -l cert-days -r -d 'The new certificate\'s validity in days (default 730)'
complete -c enos-replace -n '__fish_enos-replace_seen_command device' -l no-cert-check -d 'Do not list the device\'s certificates (a valid one then does not stop the replace)'
complete -c enos-replace -n '__fish_enos-replace_seen_command device' -l tag -r -d 'Stamp the asset with a tag after the replace (repeatable): NAME=VALUE'
complete -c enos-replace -n '__fish_enos-replace_seen_command device' -l stamp -d 'Also tag replacedAt (UTC) and replacedFrom (the old key), to find the swap later'
complete -c enos-replace -n '__fish_enos-replace_seen_command device' -l json -d 'Print one JSON document on stdout'
complete -c enos-replace -n '__fish_enos-replace_seen_command device' -l show-secret -d 'Also print the new deviceSecret (default: only into --out)'
complete -c enos-replace -n '__fish_enos-replace_seen_command device' -l profile -r -d 'Profile (section) of the profile file'
complete -c enos-replace -n '__fish_enos-replace_seen_command device' -l endpoint -r -d 'API gateway URL, e.g'
complete -c enos-replace -n '__fish_enos-replace_seen_command device' -l access-key -r -d 'Application access key (appKey)'
complete -c enos-replace -n '__fish_enos-replace_seen_command device' -l secret-key -r -d 'Application secret key'
complete -c enos-replace -n '__fish_enos-replace_seen_command device' -l org-id -r -d 'Organization (OU) id'
complete -c enos-replace -n '__fish_enos-replace_seen_command device' -l private-key-file -r -d 'The application\'s RSA private key (PKCS#8 PEM), to decrypt secrets'
complete -c enos-replace -n '__fish_enos-replace_seen_command device' -l ca-file -r -d 'CA certificates (PEM) to verify the gateway with'
complete -c enos-replace -n '__fish_enos-replace_seen_command device' -l api-version -xa 'v2.4 v2.1' -d 'v2.4 (default; encrypted secrets) or v2.1 (clear secrets)'
complete -c enos-replace -n '__fish_enos-replace_seen_command device' -l timeout -r -d 'Per-request timeout in seconds (default 30)'

complete -c enos-replace -n '__fish_enos-replace_seen_command batch' -s h -l help -d 'Show this help and exit'
complete -c enos-replace -n '__fish_enos-replace_seen_command batch' -l concurrency -r -d 'Rows in flight at once (default 8)'
complete -c enos-replace -n '__fish_enos-replace_seen_command batch' -l qps -r -d 'At most this many requests per second (default: no cap)'
complete -c enos-replace -n '__fish_enos-replace_seen_command batch' -l out -r -d 'Credentials file (0600; .csv or .jsonl), written as rows complete'
complete -c enos-replace -n '__fish_enos-replace_seen_command batch' -l journal -r -d 'Journal file (default PLAN.journal): makes the batch resumable'
complete -c enos-replace -n '__fish_enos-replace_seen_command batch' -l results -r -d 'Results file (default: the journal\'s name with .journal replaced by .results.csv): every row\'s outcome'
complete -c enos-replace -n '__fish_enos-replace_seen_command batch' -l resume -d 'Continue the batch of --journal: skip done rows, reconcile rows that were in flight'
complete -c enos-replace -n '__fish_enos-replace_seen_command batch' -l reverify -d 'With --resume: read every row the journal says is done back from the platform and trust only what it shows (for a plan that changed since the journal began, or a journal in doubt)'
complete -c enos-replace -n '__fish_enos-replace_seen_command batch' -l check -d 'Only check the plan (every row, duplicates); send nothing'
complete -c enos-replace -n '__fish_enos-replace_seen_command batch' -l dry-run -d 'Check the plan, then look every row up on the platform in bulk (about two calls per 100 rows) and list the rows that would fail; change nothing'
complete -c enos-replace -n '__fish_enos-replace_seen_command batch' -l read-batch -r -d 'Rows read in one bulk call (Search Device) by the preflight, the verification and --dry-run (1-200, default 100)'
complete -c enos-replace -n '__fish_enos-replace_seen_command batch' -l max-retry-after -r -d 'The longest Retry-After (s) the batch honours when throttled (default 300)'
complete -c enos-replace -n '__fish_enos-replace_seen_command batch' -l wait-active -r -d 'After the batch, watch its replaced devices (as `enos-replace watch` does) until they are online, at most this many seconds; exit 7 if some are not'
complete -c enos-replace -n '__fish_enos-replace_seen_command batch' -l no-secret -d 'Do not request the new deviceSecrets'
complete -c enos-replace -n '__fish_enos-replace_seen_command batch' -s y -l yes -d 'Do not ask for confirmation'
complete -c enos-replace -n '__fish_enos-replace_seen_command batch' -l json -d 'Print the summary as one JSON document on stdout'
complete -c enos-replace -n '__fish_enos-replace_seen_command batch' -l subdevices -d 'Ask each device\'s gateway (Get Gateway: one more call per device), restore a link the replace dropped, name the gateway in the credentials and write one file per gateway of its sub-devices\' new triples'
complete -c enos-replace -n '__fish_enos-replace_seen_command batch' -l check-certificates -d 'List each row\'s certificates (one more call per device): a row with valid ones and no csr is refused'
complete -c enos-replace -n '__fish_enos-replace_seen_command batch' -l cert-days -r -d 'Validity in days of the certificates issued for the plan\'s csr column (default 730)'
complete -c enos-replace -n '__fish_enos-replace_seen_command batch' -l tag -r -d 'Stamp each replaced asset with a tag (repeatable): NAME=VALUE'
complete -c enos-replace -n '__fish_enos-replace_seen_command batch' -l stamp -d 'Also tag replacedAt (UTC) and replacedFrom (the old key)'
complete -c enos-replace -n '__fish_enos-replace_seen_command batch' -l profile -r -d 'Profile (section) of the profile file'
complete -c enos-replace -n '__fish_enos-replace_seen_command batch' -l endpoint -r -d 'API gateway URL, e.g'
complete -c enos-replace -n '__fish_enos-replace_seen_command batch' -l access-key -r -d 'Application access key (appKey)'
complete -c enos-replace -n '__fish_enos-replace_seen_command batch' -l secret-key -r -d 'Application secret key'
complete -c enos-replace -n '__fish_enos-replace_seen_command batch' -l org-id -r -d 'Organization (OU) id'
complete -c enos-replace -n '__fish_enos-replace_seen_command batch' -l private-key-file -r -d 'The application\'s RSA private key (PKCS#8 PEM), to decrypt secrets'
complete -c enos-replace -n '__fish_enos-replace_seen_command batch' -l ca-file -r -d 'CA certificates (PEM) to verify the gateway with'
complete -c enos-replace -n '__fish_enos-replace_seen_command batch' -l api-version -xa 'v2.4 v2.1' -d 'v2.4 (default; encrypted secrets) or v2.1 (clear secrets)'
complete -c enos-replace -n '__fish_enos-replace_seen_command batch' -l timeout -r -d 'Per-request timeout in seconds (default 30)'

complete -c enos-replace -n '__fish_enos-replace_seen_command watch' -s h -l help -d 'Show this help and exit'
complete -c enos-replace -n '__fish_enos-replace_seen_command watch' -l wait -r -d 'Stop after this many seconds (default 3600)'
complete -c enos-replace -n '__fish_enos-replace_seen_command watch' -l interval -r -d 'Seconds between polls (default 10)'
complete -c enos-replace -n '__fish_enos-replace_seen_command watch' -l by -r -d 'Count by this column of the plan or results file (e.g'
complete -c enos-replace -n '__fish_enos-replace_seen_command watch' -l qps -r -d 'At most this many requests per second (default: no cap)'
complete -c enos-replace -n '__fish_enos-replace_seen_command watch' -l json -d 'JSON Lines on stdout: one object a poll, the last one with "final": true'
complete -c enos-replace -n '__fish_enos-replace_seen_command watch' -l profile -r -d 'Profile (section) of the profile file'
complete -c enos-replace -n '__fish_enos-replace_seen_command watch' -l endpoint -r -d 'API gateway URL, e.g'
complete -c enos-replace -n '__fish_enos-replace_seen_command watch' -l access-key -r -d 'Application access key (appKey)'
complete -c enos-replace -n '__fish_enos-replace_seen_command watch' -l secret-key -r -d 'Application secret key'
complete -c enos-replace -n '__fish_enos-replace_seen_command watch' -l org-id -r -d 'Organization (OU) id'
complete -c enos-replace -n '__fish_enos-replace_seen_command watch' -l private-key-file -r -d 'The application\'s RSA private key (PKCS#8 PEM), to decrypt secrets'
complete -c enos-replace -n '__fish_enos-replace_seen_command watch' -l ca-file -r -d 'CA certificates (PEM) to verify the gateway with'
complete -c enos-replace -n '__fish_enos-replace_seen_command watch' -l api-version -xa 'v2.4 v2.1' -d 'v2.4 (default; encrypted secrets) or v2.1 (clear secrets)'
complete -c enos-replace -n '__fish_enos-replace_seen_command watch' -l timeout -r -d 'Per-request timeout in seconds (default 30)'

complete -c enos-replace -n '__fish_enos-replace_seen_command audit' -s h -l help -d 'Show this help and exit'
complete -c enos-replace -n '__fish_enos-replace_seen_command audit' -l platform -d 'Also search the platform: inactive devices with the replacedAt tag (one call a page of 200)'
complete -c enos-replace -n '__fish_enos-replace_seen_command audit' -l min-age -r -d 'Only devices replaced at least this many seconds ago'
complete -c enos-replace -n '__fish_enos-replace_seen_command audit' -l json -d 'JSON Lines on stdout: one object a device'
complete -c enos-replace -n '__fish_enos-replace_seen_command audit' -l profile -r -d 'Profile (section) of the profile file'
complete -c enos-replace -n '__fish_enos-replace_seen_command audit' -l endpoint -r -d 'API gateway URL, e.g'
complete -c enos-replace -n '__fish_enos-replace_seen_command audit' -l access-key -r -d 'Application access key (appKey)'
complete -c enos-replace -n '__fish_enos-replace_seen_command audit' -l secret-key -r -d 'Application secret key'
complete -c enos-replace -n '__fish_enos-replace_seen_command audit' -l org-id -r -d 'Organization (OU) id'
complete -c enos-replace -n '__fish_enos-replace_seen_command audit' -l private-key-file -r -d 'The application\'s RSA private key (PKCS#8 PEM), to decrypt secrets'
complete -c enos-replace -n '__fish_enos-replace_seen_command audit' -l ca-file -r -d 'CA certificates (PEM) to verify the gateway with'
complete -c enos-replace -n '__fish_enos-replace_seen_command audit' -l api-version -xa 'v2.4 v2.1' -d 'v2.4 (default; encrypted secrets) or v2.1 (clear secrets)'
complete -c enos-replace -n '__fish_enos-replace_seen_command audit' -l timeout -r -d 'Per-request timeout in seconds (default 30)'

complete -c enos-replace -n '__fish_enos-replace_seen_command get' -s h -l help -d 'Show this help and exit'
complete -c enos-replace -n '__fish_enos-replace_seen_command get' -l asset-id -r -d 'The device\'s assetId'
complete -c enos-replace -n '__fish_enos-replace_seen_command get' -l product-key -r -d 'The device\'s productKey (with --device-key)'
complete -c enos-replace -n '__fish_enos-replace_seen_command get' -l device-key -r -d 'The device\'s current deviceKey (with --product-key)'
complete -c enos-replace -n '__fish_enos-replace_seen_command get' -l secret -d 'Request the deviceSecret (decrypted with --private-key-file on V2.4)'
complete -c enos-replace -n '__fish_enos-replace_seen_command get' -l out -r -d 'Write the record with the secret to this new file, mode 0600'
complete -c enos-replace -n '__fish_enos-replace_seen_command get' -l format -xa 'json env text' -d 'Record format: json (default), env or text'
complete -c enos-replace -n '__fish_enos-replace_seen_command get' -l overwrite -d 'Allow --out to replace an existing file'
complete -c enos-replace -n '__fish_enos-replace_seen_command get' -l show-secret -d 'Print the secret on stdout'
complete -c enos-replace -n '__fish_enos-replace_seen_command get' -l json -d 'Print one JSON document on stdout'
complete -c enos-replace -n '__fish_enos-replace_seen_command get' -l profile -r -d 'Profile (section) of the profile file'
complete -c enos-replace -n '__fish_enos-replace_seen_command get' -l endpoint -r -d 'API gateway URL, e.g'
complete -c enos-replace -n '__fish_enos-replace_seen_command get' -l access-key -r -d 'Application access key (appKey)'
complete -c enos-replace -n '__fish_enos-replace_seen_command get' -l secret-key -r -d 'Application secret key'
complete -c enos-replace -n '__fish_enos-replace_seen_command get' -l org-id -r -d 'Organization (OU) id'
complete -c enos-replace -n '__fish_enos-replace_seen_command get' -l private-key-file -r -d 'The application\'s RSA private key (PKCS#8 PEM), to decrypt secrets'
complete -c enos-replace -n '__fish_enos-replace_seen_command get' -l ca-file -r -d 'CA certificates (PEM) to verify the gateway with'
complete -c enos-replace -n '__fish_enos-replace_seen_command get' -l api-version -xa 'v2.4 v2.1' -d 'v2.4 (default; encrypted secrets) or v2.1 (clear secrets)'
complete -c enos-replace -n '__fish_enos-replace_seen_command get' -l timeout -r -d 'Per-request timeout in seconds (default 30)'

complete -c enos-replace -n '__fish_enos-replace_seen_command config' -s h -l help -d 'Show this help and exit'
complete -c enos-replace -n '__fish_enos-replace_seen_command config' -l json -d 'Print one JSON document on stdout'
complete -c enos-replace -n '__fish_enos-replace_seen_command config' -l profile -r -d 'Profile (section) of the profile file'
complete -c enos-replace -n '__fish_enos-replace_seen_command config' -l endpoint -r -d 'API gateway URL, e.g'
complete -c enos-replace -n '__fish_enos-replace_seen_command config' -l access-key -r -d 'Application access key (appKey)'
complete -c enos-replace -n '__fish_enos-replace_seen_command config' -l secret-key -r -d 'Application secret key'
complete -c enos-replace -n '__fish_enos-replace_seen_command config' -l org-id -r -d 'Organization (OU) id'
complete -c enos-replace -n '__fish_enos-replace_seen_command config' -l private-key-file -r -d 'The application\'s RSA private key (PKCS#8 PEM), to decrypt secrets'
complete -c enos-replace -n '__fish_enos-replace_seen_command config' -l ca-file -r -d 'CA certificates (PEM) to verify the gateway with'
complete -c enos-replace -n '__fish_enos-replace_seen_command config' -l api-version -xa 'v2.4 v2.1' -d 'v2.4 (default; encrypted secrets) or v2.1 (clear secrets)'
complete -c enos-replace -n '__fish_enos-replace_seen_command config' -l timeout -r -d 'Per-request timeout in seconds (default 30)'

complete -c enos-replace -n '__fish_enos-replace_seen_command help' -s h -l help -d 'Show this help and exit'

complete -c enos-replace -n '__fish_enos-replace_seen_command completion' -s h -l help -d 'Show this help and exit'
