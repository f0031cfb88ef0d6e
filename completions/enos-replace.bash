_enos-replace() {
    local IFS=$' \t\n'
    local args cur prev cmd opts arg
    args=("${COMP_WORDS[@]}")
    cur="${COMP_WORDS[COMP_CWORD]}"
    prev="${COMP_WORDS[COMP_CWORD-1]}"
    opts="-h --help --version"

    args=("${args[@]:1}")
    for arg in "${args[@]}"; do
        case "$arg" in
            device)
                cmd="device"
                opts="$opts -h --help --asset-id --product-key --device-key --new-key --no-secret --out --format --overwrite --wait-active --dry-run -y --yes --skip-free-check --max-attempts --max-retry-after --finish --no-gateway-check --csr --cert-days --no-cert-check --tag --stamp --json --show-secret --profile --endpoint --access-key --secret-key --org-id --private-key-file --ca-file --api-version --timeout"
                break
                ;;
            batch)
                cmd="batch"
                opts="$opts -h --help --concurrency --qps --out --journal --results --resume --reverify --check --dry-run --read-batch --max-retry-after --wait-active --no-secret -y --yes --json --subdevices --check-certificates --cert-days --tag --stamp --profile --endpoint --access-key --secret-key --org-id --private-key-file --ca-file --api-version --timeout"
                break
                ;;
            watch)
                cmd="watch"
                opts="$opts -h --help --wait --interval --by --qps --json --profile --endpoint --access-key --secret-key --org-id --private-key-file --ca-file --api-version --timeout"
                break
                ;;
            audit)
                cmd="audit"
                opts="$opts -h --help --platform --min-age --json --profile --endpoint --access-key --secret-key --org-id --private-key-file --ca-file --api-version --timeout"
                break
                ;;
            get)
                cmd="get"
                opts="$opts -h --help --asset-id --product-key --device-key --secret --out --format --overwrite --show-secret --json --profile --endpoint --access-key --secret-key --org-id --private-key-file --ca-file --api-version --timeout"
                break
                ;;
            config)
                cmd="config"
                opts="$opts -h --help --json --profile --endpoint --access-key --secret-key --org-id --private-key-file --ca-file --api-version --timeout"
                break
                ;;
            help)
                cmd="help"
                opts="$opts -h --help"
                break
                ;;
            completion)
                cmd="completion"
                opts="$opts -h --help"
                break
                ;;
        esac
    done

    case "$cmd" in
        '')
            COMPREPLY=($(compgen -W "device batch watch audit get config help completion" -- "$cur"))
            ;;
        'device')
            case "$prev" in
                --asset-id)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --product-key)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --device-key)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --new-key)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --out)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --format)
                    COMPREPLY=($(compgen -W "json env text" -- "$cur"))
                    return 0
                    ;;
                --wait-active)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --max-attempts)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --max-retry-after)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --csr)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --cert-days)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --tag)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --profile)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --endpoint)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --access-key)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --secret-key)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --org-id)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --private-key-file)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --ca-file)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --api-version)
                    COMPREPLY=($(compgen -W "v2.4 v2.1" -- "$cur"))
                    return 0
                    ;;
                --timeout)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
            esac

            ;;
        'batch')
            case "$prev" in
                --concurrency)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --qps)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --out)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --journal)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --results)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --read-batch)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --max-retry-after)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --wait-active)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --cert-days)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --tag)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --profile)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --endpoint)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --access-key)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --secret-key)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --org-id)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --private-key-file)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --ca-file)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --api-version)
                    COMPREPLY=($(compgen -W "v2.4 v2.1" -- "$cur"))
                    return 0
                    ;;
                --timeout)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
            esac

            ;;
        'watch')
            case "$prev" in
                --wait)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --interval)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --by)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --qps)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --profile)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --endpoint)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --access-key)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --secret-key)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --org-id)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --private-key-file)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --ca-file)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --api-version)
                    COMPREPLY=($(compgen -W "v2.4 v2.1" -- "$cur"))
                    return 0
                    ;;
                --timeout)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
            esac

            ;;
        'audit')
            case "$prev" in
                --min-age)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --profile)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --endpoint)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --access-key)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --secret-key)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --org-id)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --private-key-file)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --ca-file)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --api-version)
                    COMPREPLY=($(compgen -W "v2.4 v2.1" -- "$cur"))
                    return 0
                    ;;
                --timeout)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
            esac

            ;;
        'get')
            case "$prev" in
                --asset-id)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --product-key)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --device-key)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --out)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --format)
                    COMPREPLY=($(compgen -W "json env text" -- "$cur"))
                    return 0
                    ;;
                --profile)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --endpoint)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --access-key)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --secret-key)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --org-id)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --private-key-file)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --ca-file)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --api-version)
                    COMPREPLY=($(compgen -W "v2.4 v2.1" -- "$cur"))
                    return 0
                    ;;
                --timeout)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
            esac

            ;;
        'config')
            case "$prev" in
                --profile)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --endpoint)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --access-key)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --secret-key)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --org-id)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --private-key-file)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --ca-file)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
                --api-version)
                    COMPREPLY=($(compgen -W "v2.4 v2.1" -- "$cur"))
                    return 0
                    ;;
                --timeout)
                    COMPREPLY=($(compgen -f -- "$cur"))
                    return 0
                    ;;
            esac

            ;;
    esac

    if [[ "$cur" = -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    fi
}

complete -F _enos-replace -o bashdefault -o default enos-replace
